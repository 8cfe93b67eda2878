import torch

SIZE = int("not a number")  # raises ValueError on import


def model():
    return torch.nn.Linear(4, 4)


def example_inputs():
    return (torch.randn(2, 4),)
