"""`python -m sparsec …` (also what `torchrun -m sparsec` runs)."""

from .cli import main

main()
