"""Training commands: `torchrun -m train.pretrain` and `torchrun -m train.posttrain`."""
