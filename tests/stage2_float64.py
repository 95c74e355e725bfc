"""train_stage2.main in float64 with dropout off: `python tests/stage2_float64.py ARGS` alone, or
under torchrun. test_reliability.py compares a run of 2 processes with a run of one process on the
same global batches, through the real wiring (sampler, SyncBatchNorm, CIA, mask, AdamW).

Two things are switched off, and only these: dropout (two runs must compute the same function, and
each process draws its own masks), and float32 (in float32 any two reduction orders differ in the
last bits, and AdamW turns such noise in gradients that are zero in exact arithmetic, such as the
biases before a BatchNorm, into full-size updates; in float64 the noise stays far below AdamW's
eps). """
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train_stage2  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.nn.Dropout.forward = lambda self, x: x  # dropout off
read = data.TrainTriplets.__getitem__


def float64_sample(self, i):
    sample = read(self, i)
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in sample.items()}


data.TrainTriplets.__getitem__ = float64_sample

if __name__ == "__main__":
    train_stage2.main(sys.argv[1:])
