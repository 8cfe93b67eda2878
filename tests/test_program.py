import torch

from sparsec import module_path, trace


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_module_paths_come_from_nn_module_stack():
    p = trace(Net(), (torch.randn(2, 4),))
    paths = [module_path(n) for n in p.call_nodes(torch.ops.aten.linear.default)]
    assert paths == ["block.0", "head"]


def test_param_counts_follow_requires_grad():
    p = trace(Net(), (torch.randn(2, 4),))
    assert p.param_counts() == {"total": 30, "trainable": 30}
    p.gm.get_parameter("head.weight").requires_grad_(False)
    assert p.param_counts() == {"total": 30, "trainable": 22}


def test_add_parameter_registers_and_inserts_get_attr():
    p = trace(Net(), (torch.randn(2, 4),))
    first = next(iter(p.gm.graph.nodes))
    node = p.add_parameter("sparse.head.values", torch.zeros(3), trainable=True, before=first)
    assert node.op == "get_attr" and node.target == "sparse.head.values"
    assert p.get_tensor("sparse.head.values").requires_grad
    assert p.param_counts()["total"] == 33


def test_fingerprint_tells_weights_apart_and_is_stable():
    torch.manual_seed(0)
    a = trace(Net(), (torch.randn(2, 4),))
    b = trace(Net(), (torch.randn(2, 4),))
    assert a.fingerprint != b.fingerprint
    assert a.copy().fingerprint == a.fingerprint
    from sparsec.program import fingerprint
    assert fingerprint(a.gm) == a.fingerprint


def test_copy_sharing_tensors_keeps_the_graph_and_new_attributes_apart():
    p = trace(Net(), (torch.randn(2, 4),))
    deep, shared = p.copy(), p.copy(share_tensors=True)
    weight = p.gm.get_parameter("head.weight")
    assert deep.gm.get_parameter("head.weight") is not weight
    assert shared.gm.get_parameter("head.weight") is weight
    first = next(iter(shared.gm.graph.nodes))
    shared.add_parameter("extra.values", torch.zeros(3), trainable=True, before=first)
    assert shared.param_counts()["total"] == 33 and p.param_counts()["total"] == 30
    assert len(shared.gm.graph.nodes) == len(p.gm.graph.nodes) + 1
