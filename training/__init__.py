"""Training pieces used by train.py: datasets, joint transforms, metrics, checkpoints, the loop, distributed BN."""
