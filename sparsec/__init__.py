"""sparsec: an ahead-of-time compiler for sparse training and sparse attention in PyTorch.

    import sparsec
    program = sparsec.trace(model, example_inputs)          # torch.export → Program
    program = sparsec.run_passes(program, [sparsec.get_pass("dead-code")()])
    compiled = sparsec.compile(program, backend="onnx", out_dir="out")
"""

from __future__ import annotations

from ._version import __version__

from .api import compile
from .backends import Compiled, LowerOptions, lower
from .training.deltas import (
                     Deltas,
                     apply_deltas,
                     compose_deltas,
                     extract_deltas,
                     load_deltas,
                     merge_deltas,
                     save_deltas,
                     unmerge_deltas,
)
from .errors import (
                     BadInputError,
                     OptionError,
                     ParityError,
                     PassError,
                     PreconditionError,
                     RecipeError,
                     SparsecError,
                     TraceError,
                     VerificationError,
)
from .frontend import load_model_file, trace, trace_file
from .layouts import BlockLayout
from .ops.block_sparse_attention import block_sparse_attention
from .passes.base import Pass, PassResult, get_pass, option, register, registered_passes
from .pipeline import run_passes
from .program import ModelSource, PassRecord, Program, Prop, module_path, node_info
from .recipe import dump_recipe, load_recipe, parse_pass_arg, parse_recipe
from .training import DistributedTrainer, Trainer, train_distributed, train_model

__all__ = [
    "__version__",
    "compile", "trace", "trace_file", "load_model_file", "run_passes", "lower",
    "Program", "PassRecord", "ModelSource", "Prop", "module_path", "node_info",
    "Pass", "PassResult", "option", "register", "get_pass", "registered_passes",
    "Compiled", "LowerOptions",
    "BlockLayout", "block_sparse_attention",
    "load_recipe", "parse_recipe", "parse_pass_arg", "dump_recipe",
    "Trainer", "train_model", "DistributedTrainer", "train_distributed",
    "Deltas", "extract_deltas", "save_deltas", "load_deltas",
    "apply_deltas", "merge_deltas", "unmerge_deltas", "compose_deltas",
    "SparsecError", "BadInputError", "TraceError", "RecipeError", "OptionError",
    "PreconditionError", "PassError", "VerificationError", "ParityError",
]
