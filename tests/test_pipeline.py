from dataclasses import dataclass

import pytest
import torch

from sparsec import (
    Pass,
    PassError,
    PassResult,
    PreconditionError,
    Prop,
    VerificationError,
    register,
    run_passes,
    trace,
)
from sparsec.passes.cleanup import DeadCode


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


@pytest.fixture
def program():
    torch.manual_seed(0)
    return trace(TwoLayer(), (torch.randn(3, 6),))


@register
@dataclass(frozen=True)
class _DropResidual(Pass):
    """A deliberately wrong pass: replaces the residual add by its first operand."""

    name = "test-drop-residual"

    def run(self, program):
        n = 0
        for node in program.call_nodes(torch.ops.aten.add.Tensor):
            node.replace_all_uses_with(node.args[0])
            program.gm.graph.erase_node(node)
            n += 1
        return PassResult(modified=n > 0, stats={"dropped": n})


@register
@dataclass(frozen=True)
class _NeedsJoint(Pass):
    name = "test-needs-joint"
    requires = frozenset({Prop.JOINT_GRAPH})

    def run(self, program):
        return PassResult(False)


@register
@dataclass(frozen=True)
class _Raises(Pass):
    name = "test-raises"

    def run(self, program):
        raise ValueError("boom")


@register
@dataclass(frozen=True)
class _Establishes(Pass):
    name = "test-establishes"
    establishes = frozenset({"test_prop"})
    invalidates = frozenset({Prop.FORWARD_GRAPH})

    def run(self, program):
        return PassResult(False)


def test_records_history_and_does_not_mutate_input(program):
    nodes = len(program.gm.graph.nodes)
    out = run_passes(program, [DeadCode(), DeadCode()])
    assert [r.name for r in out.history] == ["dead-code", "dead-code"]
    assert out.history[0].verify["max_abs_err"] == 0.0
    assert out.state["verify"]["reference"] == "eager model"
    assert program.history == [] and len(program.gm.graph.nodes) == nodes


def test_verification_catches_a_wrong_pass(program):
    with pytest.raises(VerificationError, match="test-drop-residual.*changed the outputs"):
        run_passes(program, [_DropResidual()])
    # without verification the broken program goes through: the check is what caught it
    assert run_passes(program, [_DropResidual()], verify=False).history[0].modified


def test_precondition_error_names_missing_prop(program):
    with pytest.raises(PreconditionError, match="requires 'joint_graph'"):
        run_passes(program, [_NeedsJoint()])


@register
@dataclass(frozen=True)
class _NeedsTestProp(Pass):
    name = "test-needs-test-prop"
    requires = frozenset({"test_prop"})

    def run(self, program):
        return PassResult(False)


def test_precondition_error_names_the_provider(program):
    with pytest.raises(PreconditionError, match="'test_prop' \\(run 'test-establishes' before it"):
        run_passes(program, [_NeedsTestProp()])
    p = run_passes(program, [_Establishes(), _NeedsTestProp()])
    assert "test_prop" in p.props and Prop.FORWARD_GRAPH not in p.props
    with pytest.raises(PreconditionError, match="'forward_graph'"):
        run_passes(program, [_Establishes(), DeadCode()])


def test_pass_error_names_pass_and_predecessors(program):
    match = r"'test-raises' failed \(after dead-code\): ValueError: boom"
    with pytest.raises(PassError, match=match):
        run_passes(program, [DeadCode(), _Raises()])


def test_dump_dir_writes_graph_per_pass(program, tmp_path):
    run_passes(program, [DeadCode(), DeadCode()], dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_input.py", "001_dead-code.py", "002_dead-code.py"]
    assert "aten.linear" in (tmp_path / "001_dead-code.py").read_text()


def test_nan_inputs_are_refused_under_verify():
    from sparsec import BadInputError

    p = trace(TwoLayer(), (torch.full((2, 6), float("nan")),), check=False)
    with pytest.raises(BadInputError, match="NaN or Inf"):
        run_passes(p, [DeadCode()])
    run_passes(p, [DeadCode()], verify=False)


def test_dead_code_removes_unused_nodes_and_params():
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            _ = self.unused(x)
            return self.used(x)

    p = trace(Unused(), (torch.randn(2, 4),))
    before = p.param_counts()["total"]
    out = run_passes(p, [DeadCode()])
    assert out.history[0].modified
    assert out.param_counts()["total"] == before - 20


def test_normwise_error_of_a_negligible_tensor_is_taken_against_the_floor():
    """A gradient that is rounding noise (an attention key bias's, exactly zero in exact
    arithmetic) beside real ones: its own relative error is 100 %, the floored one small; a
    tensor that is small but real keeps its own relative error."""
    from sparsec.pipeline import compare_outputs

    big = torch.linspace(-1, 1, 4096, dtype=torch.float64)
    noise = torch.full((64,), 1e-7, dtype=torch.float64)
    assert compare_outputs((big, noise), (big, -noise))["rel_l2_err"] < 1e-3
    assert compare_outputs((big, noise), (big, torch.zeros(64)))["rel_l2_err"] < 1e-3
    small = torch.full((64,), 0.1, dtype=torch.float64)  # 1/6 of big's RMS: above the floor
    assert compare_outputs((big, 1.1 * small), (big, small))["rel_l2_err"] > 0.09
    tiny = torch.full((64,), 0.02, dtype=torch.float64)  # 1/29: below, judged on the floor
    assert 0.01 < compare_outputs((big, 2 * tiny), (big, tiny))["rel_l2_err"] < 0.5
    assert compare_outputs((big, noise), (big, noise * 2))["max_rel_err"] > 0.4


def test_a_pass_that_says_unmodified_must_not_change_the_graph(program):
    @dataclass(frozen=True)
    class Liar(Pass):
        name = "test-liar"

        def run(self, program):
            node = next(n for n in program.gm.graph.nodes if n.op == "output")
            with program.gm.graph.inserting_before(node):
                program.gm.graph.call_function(torch.ops.aten.relu.default, (node.args[0][0],))
            return PassResult(modified=False)

    with pytest.raises(PassError, match="modified=False but changed the graph"):
        run_passes(program, [Liar()])
    run_passes(program, [Liar()], verify=False)  # unchecked without verify


def test_an_established_prop_is_checked(program):
    @dataclass(frozen=True)
    class FakeJoint(Pass):
        name = "test-fake-joint"
        establishes = frozenset({Prop.JOINT_GRAPH})
        invalidates = frozenset({Prop.FORWARD_GRAPH})

        def run(self, program):
            return PassResult(modified=False)

    with pytest.raises(PassError, match="holds prop 'joint_graph' but the program is not a "
                                        "training step"):
        run_passes(program, [FakeJoint()])
