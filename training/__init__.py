"""Pieces of `train.py`: data, loss, epoch loop, checkpoints (process groups: common.distributed)."""
