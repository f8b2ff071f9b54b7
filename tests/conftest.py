import torch

# The tests use tiny tensors: one thread avoids thread-pool overhead and contention on 2-core CI.
torch.set_num_threads(1)
