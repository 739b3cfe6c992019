"""The train stage's helpers: batches (padded and padding-free), several processes
(torchrun / accelerate), checkpoints and the loss log.
"""
