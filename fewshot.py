"""Few-shot linear probing on frozen features (paper section 4; OpenShape's and Point-BERT's
protocols).

A probe is a multinomial logistic regression on frozen, L2-normalised features, fitted by LBFGS
until it has converged, on the training shapes only: it never looks at the test shapes (the release
reports the best test epoch of its linear layer instead). Two protocols draw their splits from one
benchmark's shapes:
  - `episodes` (Point-BERT's settings): N-way K-shot episodes, 20 query shapes per class, 10
    episodes;
  - `openshape` (OpenShape's figure): K shapes of every class for training, the rest for testing, 10
    times.
The third protocol, Point-BERT's released ModelNet40 folds, reads files: evaluate.py's
few_shot_folds.
"""
import numpy as np
import torch
import torch.nn.functional as F

EPISODES = ("5x10", "10x20")         # N-way x K-shot episodes (Point-BERT's settings)
N_QUERY = 20                         # query shapes per class and episode (Point-BERT)
TRIALS = 10                          # episodes or repeats per setting (Point-BERT, OpenShape)
OPENSHAPE_SHOTS = (1, 2, 4, 8, 16)   # shapes per class in OpenShape's few-shot figure
PROBE_STEPS = 100                    # LBFGS iterations of the probe
PROBE_L2 = 1e-3                      # L2 weight that keeps separable problems well posed


def probe_features(feats, choice, single_branch=False):
    """(M, F) L2-normalised features to probe (one L2 strength then suits all): the encoder output
    ("backbone"), one head's output, or "both" heads concatenated (one copy for a single-branch
    model, whose two outputs are equal)."""
    if choice == "backbone":
        return F.normalize(feats["backbone"].double(), dim=1)
    if choice in ("text", "image") or single_branch:
        return F.normalize(feats["text" if single_branch else choice].double(), dim=1)
    return torch.cat([F.normalize(feats[k].double(), dim=1) for k in ("text", "image")], 1)


def class_pool(labels, need):
    """The classes with at least `need` shapes (the others are left out of a protocol)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return classes[counts >= need]


def sample_episode(labels, n_way, k_shot, n_query, seed):
    """One N-way K-shot episode: (support, query) index arrays, n_way * k_shot and n_way * n_query
    long, grouped by class, disjoint, among the classes with >= k_shot + n_query shapes."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool = class_pool(labels, k_shot + n_query)
    if len(pool) < n_way:
        raise ValueError(f"{n_way}-way {k_shot}-shot needs {n_way} classes with >= "
                         f"{k_shot + n_query} shapes, found {len(pool)}")
    picked = []
    for c in rng.choice(pool, n_way, replace=False):
        picked.append(rng.permutation(np.flatnonzero(labels == c))[: k_shot + n_query])
    support = np.concatenate([p[:k_shot] for p in picked])
    query = np.concatenate([p[k_shot:] for p in picked])
    return support, query


def openshape_split(labels, k_shot, seed):
    """OpenShape's split: k_shot random shapes of every class with more than k_shot for training,
    the rest for testing."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c)) for c in class_pool(labels, k_shot + 1)]
    if not picked:
        raise ValueError(f"{k_shot}-shot: no class has more than {k_shot} shapes")
    train = np.concatenate([p[:k_shot] for p in picked])
    test = np.concatenate([p[k_shot:] for p in picked])
    return train, test


def linear_probe(train_x, train_y, test_x, test_y, steps=PROBE_STEPS, l2=PROBE_L2):
    """Multinomial logistic regression on frozen features (LBFGS, L2 on the weights), fitted on the
    training shapes only -> accuracy on the test shapes. Labels may be any class ids."""
    train_x = torch.as_tensor(train_x).double()
    test_x = torch.as_tensor(test_x).double()
    classes, y = torch.unique(torch.as_tensor(train_y), return_inverse=True)
    weight = torch.zeros(train_x.shape[1], len(classes), dtype=torch.double, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        predicted = classes[(test_x @ weight + bias).argmax(1)]
    return (predicted == torch.as_tensor(test_y)).double().mean().item()


def summary(accuracies, **extra):
    """Mean and standard deviation (ddof 0) of a protocol's trials."""
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "trials": len(accuracies), **extra}


def few_shot(x, labels, episodes=EPISODES, n_query=N_QUERY, trials=TRIALS, shots=OPENSHAPE_SHOTS,
             seed=0, steps=PROBE_STEPS, l2=PROBE_L2):
    """The `episodes` and `openshape` protocols on features x (M, F) of one benchmark -> {setting:
    summary, or {"skipped": why}}. Trial t uses seed + t."""
    labels = np.asarray(labels)
    results = {}
    for setting in episodes:
        n_way, k_shot = (int(v) for v in setting.split("x"))
        key = f"episodes {n_way}-way {k_shot}-shot"
        pool = class_pool(labels, k_shot + n_query)
        if len(pool) < n_way:
            why = f"needs {n_way} classes with >= {k_shot} + {n_query} shapes, {len(pool)} have"
            results[key] = {"skipped": why + " that many"}
            continue
        accuracies = []
        for t in range(trials):
            support, query = sample_episode(labels, n_way, k_shot, n_query, seed + t)
            accuracy = linear_probe(x[support], labels[support], x[query], labels[query], steps, l2)
            accuracies.append(accuracy)
        results[key] = summary(accuracies, classes_in_pool=len(pool))
    for k_shot in shots:
        key = f"openshape {k_shot}-shot"
        pool = class_pool(labels, k_shot + 1)
        if len(pool) < 2:
            results[key] = {"skipped": f"fewer than 2 classes have more than {k_shot} shapes"}
            continue
        accuracies = []
        for t in range(trials):
            train, test = openshape_split(labels, k_shot, seed + t)
            accuracy = linear_probe(x[train], labels[train], x[test], labels[test], steps, l2)
            accuracies.append(accuracy)
        results[key] = summary(accuracies, classes_in_pool=len(pool))
    return results
