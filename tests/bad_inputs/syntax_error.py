import torch

def model(:
    return torch.nn.Linear(4, 4)
