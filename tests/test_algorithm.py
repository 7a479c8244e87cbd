"""The server and client steps against values worked out by hand, and the rule's properties."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedgradnorm.algorithm import (
    MAX_LOSS_RATIO,
    AdamConfig,
    AdamState,
    AlgorithmError,
    ClientConfig,
    ClientUpdate,
    ClientWeight,
    ModuleAdam,
    Optimizer,
    ServerConfig,
    ServerState,
    adam_step,
    client_step,
    default_omega_tilde,
    safe_mean,
    server_step,
    update_weights,
    validate_update,
)

TILDE = ("last.weight", "last.bias")


def omega() -> dict[str, torch.Tensor]:
    return {
        "first.weight": torch.tensor([[0.5, -0.5], [1.0, 2.0]]),
        "last.weight": torch.tensor([0.1, 0.2]),
        "last.bias": torch.tensor([0.3]),
    }


def grad(first: list[list[float]], last: list[float], bias: float) -> dict[str, torch.Tensor]:
    return {
        "first.weight": torch.tensor(first),
        "last.weight": torch.tensor(last),
        "last.bias": torch.tensor([bias]),
    }


def test_default_omega_tilde_is_last_layer() -> None:
    assert default_omega_tilde(omega()) == TILDE


def test_two_clients_against_hand_worked_values() -> None:
    # Client a: ||g~|| = ||(3, 0, 4)|| = 5; client b: ||(0, 1, 0)|| = 1. p = 1 for both.
    ga = grad([[1.0, 0.0], [0.0, 2.0]], [3.0, 0.0], 4.0)
    gb = grad([[-1.0, 4.0], [0.0, 0.0]], [0.0, 1.0], 0.0)
    state = ServerState.initial(omega())
    state.round = 7
    updates = [ClientUpdate("b", gb, 0.2), ClientUpdate("a", ga, 0.6)]
    cfg = ServerConfig(gamma=0.9, alpha=0.004, beta=0.0002, omega_tilde=TILDE)

    result = server_step(state, updates, cfg)

    # By hand: G = (5, 1), G_bar = 3; mean F~ = 0.4, r = (1.5, 0.5);
    # target = 3 * r^0.9 = (4.3210..., 1.6077...); G - target = (+0.679, -0.608):
    # dF_grad/dp = (+5, -1). Adam's first step moves each p by lr * g / (|g| + eps).
    target_a, target_b = 3 * 1.5**0.9, 3 * 0.5**0.9
    assert result.reports["a"].target == pytest.approx(target_a, rel=1e-12)
    assert result.reports["b"].target == pytest.approx(target_b, rel=1e-12)
    assert result.reports["a"].relative_rate == pytest.approx(1.5)
    assert result.f_grad == pytest.approx(abs(5 - target_a) + abs(1 - target_b), rel=1e-12)
    pa = 1 - 0.004 * 5 / (5 + 1e-8)
    pb = 1 + 0.004 * 1 / (1 + 1e-8)
    s = pa + pb  # renormalised to sum 2 (here already 2 up to eps)
    pa, pb = 2 * pa / s, 2 * pb / s
    assert state.weights["a"].p == pytest.approx(pa, abs=1e-12)
    assert state.weights["b"].p == pytest.approx(pb, abs=1e-12)
    assert result.reports["a"].grad_norm == pytest.approx(5.0)
    assert result.reports["b"].grad_norm == pytest.approx(1.0)

    # g = (pa * ga + pb * gb) / 2; Adam's first step on omega moves each entry by -beta * sign(g).
    for name, w0 in omega().items():
        g = (pa * ga[name] + pb * gb[name]) / 2
        expected = w0 - 0.0002 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(state.omega[name], expected, rtol=0, atol=1e-7)
    assert state.round == 8 and result.round == 7


def test_three_clients_second_round_uses_adam_moments() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(omega_tilde=TILDE)
    g = {c: grad([[0.0, 0.0], [0.0, 0.0]], [n, 0.0], 0.0) for c, n in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
    ratios = {"a": 1.0, "b": 1.0, "c": 1.0}
    server_step(state, [ClientUpdate(c, g[c], ratios[c]) for c in g], cfg)
    first = dict(state.weights)
    server_step(state, [ClientUpdate(c, g[c], ratios[c]) for c in g], cfg)
    # Recompute round two by hand from round one's stored moments.
    p = {c: first[c].p for c in g}
    norms = {"a": 1.0, "b": 2.0, "c": 3.0}
    G = {c: p[c] * norms[c] for c in g}
    gbar = sum(G.values()) / 3
    new = {}
    for c in g:
        d = math.copysign(norms[c], G[c] - gbar)
        m = 0.9 * first[c].exp_avg + 0.1 * d
        v = 0.999 * first[c].exp_avg_sq + 0.001 * d * d
        new[c] = p[c] - 0.004 / (1 - 0.9**2) * m / (math.sqrt(v) / math.sqrt(1 - 0.999**2) + 1e-8)
    total = sum(new.values())
    for c in g:
        assert state.weights[c].p == pytest.approx(3 * new[c] / total, abs=1e-12)
        assert state.weights[c].step == 2


def test_sum_is_n_and_weights_stay_positive_under_extreme_imbalance() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(omega_tilde=TILDE, alpha=0.2)
    for _ in range(300):
        updates = [
            ClientUpdate("big", grad([[0, 0], [0, 0]], [1000.0, 0.0], 0.0), 0.01),
            ClientUpdate("mid", grad([[0, 0], [0, 0]], [1.0, 0.0], 0.0), 1.0),
            ClientUpdate("tiny", grad([[0, 0], [0, 0]], [1e-6, 0.0], 0.0), 5.0),
        ]
        server_step(state, updates, cfg)
        ps = [w.p for w in state.weights.values()]
        assert math.fsum(ps) == pytest.approx(3.0, abs=1e-9)
        assert min(ps) > 0
    assert state.weights["big"].p < state.weights["tiny"].p


def test_identical_clients_keep_identical_weights() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(omega_tilde=TILDE)
    g = grad([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5], 0.1)
    for k in range(20):
        ratio = 1.0 - 0.01 * k
        server_step(state, [ClientUpdate(c, g, ratio) for c in ("x", "y", "z")], cfg)
        ps = {w.p for w in state.weights.values()}
        assert len(ps) == 1 and ps.pop() == pytest.approx(1.0)


def test_client_whose_loss_falls_more_slowly_gains_weight() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(omega_tilde=TILDE)
    g = grad([[0, 0], [0, 0]], [1.0, 1.0], 1.0)  # same gradient norm for both
    for k in range(30):
        slow, fast = 1.0 - 0.001 * k, 1.0 - 0.02 * k
        server_step(state, [ClientUpdate("slow", g, slow), ClientUpdate("fast", g, fast)], cfg)
    assert state.weights["slow"].p > 1.0 > state.weights["fast"].p


def test_fedrep_leaves_p_at_one_and_averages_gradients() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(algorithm="fedrep", omega_tilde=TILDE)
    ga = grad([[1, 0], [0, 0]], [9.0, 0.0], 0.0)
    gb = grad([[0, 0], [0, 1]], [0.0, 0.1], 0.0)
    for ratio in (1.0, 0.5, 0.2):
        result = server_step(state, [ClientUpdate("a", ga, ratio), ClientUpdate("b", gb, 1.0)], cfg)
        assert all(r.weight == 1.0 for r in result.reports.values())
    assert {w.p for w in state.weights.values()} == {1.0}


def test_fedrep_and_fedgradnorm_differ_only_in_p() -> None:
    ga = grad([[1, 0], [0, 0]], [9.0, 0.0], 0.0)
    gb = grad([[0, 0], [0, 1]], [0.0, 0.1], 0.0)
    ups = [ClientUpdate("a", ga, 1.0), ClientUpdate("b", gb, 1.0)]
    s1, s2 = ServerState.initial(omega()), ServerState.initial(omega())
    server_step(s1, ups, ServerConfig(algorithm="fedrep", omega_tilde=TILDE))
    # With p forced to 1 on the FedGradNorm path (alpha tiny), omega moves identically.
    s2.weights = {"a": ClientWeight(), "b": ClientWeight()}
    r2 = server_step(s2, ups, ServerConfig(algorithm="fedgradnorm", omega_tilde=TILDE, alpha=1e-300))
    assert all(r.weight == pytest.approx(1.0) for r in r2.reports.values())
    for k in s1.omega:
        torch.testing.assert_close(s1.omega[k], s2.omega[k])


def test_membership_change_newcomer_starts_at_one_and_absentee_is_untouched() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(omega_tilde=TILDE)
    ga = grad([[0, 0], [0, 0]], [5.0, 0.0], 0.0)
    gb = grad([[0, 0], [0, 0]], [1.0, 0.0], 0.0)
    for _ in range(5):
        server_step(state, [ClientUpdate("a", ga, 1.0), ClientUpdate("b", gb, 1.0)], cfg)
    b_before = state.weights["b"]
    # Round with a and a newcomer c; b is missing.
    res = server_step(state, [ClientUpdate("a", ga, 1.0), ClientUpdate("c", gb, 1.0)], cfg)
    assert res.reports["c"].previous_weight == 1.0
    assert state.weights["b"] == b_before  # weight and Adam moments left as they were
    assert state.weights["a"].p + state.weights["c"].p == pytest.approx(2.0)
    assert state.weights["c"].step == 1


def test_bad_updates_are_refused_and_change_nothing() -> None:
    state = ServerState.initial(omega())
    cfg = ServerConfig(omega_tilde=TILDE)
    good = grad([[0, 0], [0, 0]], [1.0, 0.0], 0.0)
    before = {k: v.clone() for k, v in state.omega.items()}
    bad_cases = [
        [ClientUpdate("a", {**good, "last.bias": torch.tensor([float("nan")])}, 1.0)],
        [ClientUpdate("a", {**good, "last.bias": torch.zeros(2)}, 1.0)],
        # Outside omega_tilde (the norm stays finite): found on the sum, whatever the other terms.
        [
            ClientUpdate("a", good, 1.0),
            ClientUpdate("b", {**good, "first.weight": torch.tensor([[0, math.inf], [0, 0]])}, 1.0),
        ],
        [
            ClientUpdate("b", {**good, "first.weight": torch.tensor([[math.nan, 0], [0, 0]])}, 1.0),
            ClientUpdate("a", good, 1.0),
        ],
        [
            ClientUpdate("a", {**good, "first.weight": torch.tensor([[math.inf, 0], [0, 0]])}, 1.0),
            ClientUpdate("b", {**good, "first.weight": torch.tensor([[-math.inf, 0], [0, 0]])}, 1.0),
        ],
        [ClientUpdate("a", {k: v for k, v in good.items() if k != "last.bias"}, 1.0)],
        [ClientUpdate("a", good, 0.0)],
        [ClientUpdate("a", good, float("inf"))],
        [ClientUpdate("a", good, 1.0), ClientUpdate("a", good, 1.0)],
        [],
    ]
    for updates in bad_cases:
        with pytest.raises(AlgorithmError) as refused:
            server_step(state, updates, cfg)
        if any(not torch.isfinite(t).all() for u in updates for t in u.gradient.values()):
            assert "is not finite" in str(refused.value)  # the client and tensor are named
    assert state.round == 0 and state.weights == {}
    for k in before:
        assert torch.equal(before[k], state.omega[k])


def test_adam_matches_torch_bit_for_bit() -> None:
    torch.manual_seed(0)
    params = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    ref = [nn.Parameter(params["w"].clone()), nn.Parameter(params["b"].clone())]
    opt = torch.optim.Adam(ref, lr=0.01, foreach=False)
    state = AdamState.zeros_like(params)
    for _ in range(5):
        grads = {"w": torch.randn(5, 3), "b": torch.randn(3)}
        ref[0].grad, ref[1].grad = grads["w"].clone(), grads["b"].clone()
        opt.step()
        before = {k: v.clone() for k, v in params.items()}
        params, state = adam_step(params, grads, state, AdamConfig(lr=0.01))
        assert not torch.equal(before["w"], params["w"])
    assert torch.equal(params["w"], ref[0].detach()) and torch.equal(params["b"], ref[1].detach())


def test_adam_step_leaves_its_inputs_untouched() -> None:
    params = {"w": torch.randn(4, 3)}
    state = AdamState.zeros_like(params)
    grads = {"w": torch.randn(4, 3)}
    kept = ({"w": params["w"].clone()}, state.exp_avg["w"].clone(), state.exp_avg_sq["w"].clone())
    new, new_state = adam_step(params, grads, state, AdamConfig(lr=0.1))
    assert torch.equal(params["w"], kept[0]["w"]) and state.step == 0
    assert torch.equal(state.exp_avg["w"], kept[1]) and torch.equal(state.exp_avg_sq["w"], kept[2])
    assert new_state.step == 1 and not torch.equal(new["w"], params["w"])


def test_means_of_extreme_but_finite_ratios_do_not_overflow() -> None:
    assert safe_mean([1e308, 1e308]) == 1e308
    assert safe_mean([1.0, 2.0, 4.0]) == math.fsum([1.0, 2.0, 4.0]) / 3  # the plain path when it is finite
    weights, f_grad, _ = update_weights({}, {"a": 1.0, "b": 2.0}, {"a": 1e308, "b": 1e308}, ServerConfig())
    assert all(math.isfinite(w.p) for w in weights.values()) and math.isfinite(f_grad)
    assert sum(w.p for w in weights.values()) == pytest.approx(2.0)


def test_loss_ratios_beyond_the_bound_are_refused() -> None:
    omega = {"w": torch.zeros(3)}
    validate_update(ClientUpdate("a", {"w": torch.ones(3)}, MAX_LOSS_RATIO), omega)
    for bad in (MAX_LOSS_RATIO * 1.0001, 1e308, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(AlgorithmError):
            validate_update(ClientUpdate("a", {"w": torch.ones(3)}, bad), omega)


def test_a_step_that_would_poison_the_state_is_refused_and_changes_nothing() -> None:
    """A finite float32 gradient of 1e30 per element overflows Adam's second moment to +inf (after
    which omega would never move again): the step is refused and the state stays as it was."""
    state = ServerState.initial({"w": torch.randn(4, 3), "b": torch.randn(3)})
    honest = ClientUpdate("a", {"w": torch.full((4, 3), 0.01), "b": torch.full((3,), 0.01)}, 1.0)
    server_step(state, [honest], ServerConfig())
    before = (
        state.round,
        dict(state.weights),
        {k: v.clone() for k, v in state.omega.items()},
        {k: v.clone() for k, v in state.omega_adam.exp_avg_sq.items()},
        state.omega_adam.step,
    )
    huge = ClientUpdate("b", {"w": torch.full((4, 3), 1e30), "b": torch.full((3,), 1e30)}, 1.0)
    with pytest.raises(AlgorithmError, match="non-finite"):
        server_step(state, [honest, huge], ServerConfig())
    assert (state.round, state.weights, state.omega_adam.step) == (before[0], before[1], before[4])
    assert all(torch.equal(state.omega[k], before[2][k]) for k in before[2])
    assert all(torch.equal(state.omega_adam.exp_avg_sq[k], before[3][k]) for k in before[3])


def _tiny_client(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    shared = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    head = nn.Linear(6, 3)
    return shared, head, torch.optim.Adam(head.parameters(), lr=0.01)


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(16, 4, generator=g)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_client_step_first_round_ratio_is_one_and_gradient_is_mean() -> None:
    shared, head, opt = _tiny_client()
    cfg = ClientConfig(tau_h=3, tau_omega=4, beta=0.001, batch_size=16)
    head_before = [p.clone() for p in head.parameters()]
    omega_before = {k: v.clone() for k, v in shared.state_dict().items()}
    res = client_step(shared, head, opt, nn.functional.cross_entropy, _batches(1), cfg, None)
    assert res.loss_ratio == 1.0 and res.initial_loss == res.loss
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head.parameters(), strict=True))

    # Replay by hand: the same batches, the same head after its 3 steps, fresh Adam on omega.
    shared2, _, _ = _tiny_client()
    shared2.load_state_dict(omega_before)
    batches = _batches(1)
    for _ in range(3):
        next(batches)
    omega_opt = torch.optim.Adam(shared2.parameters(), lr=0.001, foreach=False)
    acc = {k: torch.zeros_like(v) for k, v in shared2.named_parameters()}
    losses = []
    for _ in range(4):
        x, y = next(batches)
        omega_opt.zero_grad()
        loss = nn.functional.cross_entropy(head(shared2(x)), y)
        loss.backward()
        losses.append(loss.item())
        for k, p in shared2.named_parameters():
            acc[k] += p.grad
        omega_opt.step()
    for k in acc:
        assert torch.equal(res.gradient[k], acc[k] / 4)  # ModuleAdam is torch's Adam bit for bit
    assert res.loss == pytest.approx(sum(losses) / 4)
    # The head is not touched by the omega phase; the shared net is left at omega_{k, tau}.
    for k, v in shared2.state_dict().items():
        assert torch.equal(shared.state_dict()[k], v)


def test_client_step_later_round_uses_stored_initial_loss() -> None:
    shared, head, opt = _tiny_client()
    cfg = ClientConfig(tau_h=1, tau_omega=2, beta=0.001, batch_size=16)
    res = client_step(shared, head, opt, nn.functional.cross_entropy, _batches(2), cfg, initial_loss=2.0)
    assert res.initial_loss == 2.0
    assert res.loss_ratio == pytest.approx(res.loss / 2.0)


def test_the_norm_bound_leaves_out_absurd_updates_only() -> None:
    from fedgradnorm.algorithm import norm_outliers

    assert norm_outliers({"a": 1.0, "b": 2.0, "c": 3e4}, 1e4) == {"c"}  # 3e4 > 1e4 x the median 2
    assert norm_outliers({"a": 1.0, "b": 2.0, "c": 1.9e4}, 1e4) == set()
    assert norm_outliers({"a": 1.0, "b": 1e30}, 1e4) == set()  # two updates: no median to trust
    assert norm_outliers({"a": 1.0, "b": 2.0, "c": 1e30}, 0) == set()  # off
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 1e30}, 1e4) == {"c"}  # zero gradients (no-train nodes)
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 0.0}, 1e4) == set()


def _two_layer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.ModuleDict({"used": nn.Linear(5, 4), "unused": nn.Linear(3, 2)})


def test_module_adam_is_torch_adam_bit_for_bit_and_shares_its_state_format() -> None:
    ours, ref = _two_layer(0), _two_layer(0)
    mine = ModuleAdam(ours.parameters(), AdamConfig(lr=0.03))
    theirs = torch.optim.Adam(ref.parameters(), lr=0.03, foreach=False)
    g = torch.Generator().manual_seed(1)

    def step(model: nn.Module, opt: Optimizer, x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        model["used"](x).pow(2).sum().backward()  # "unused" gets no gradient: skipped, no state
        opt.step()

    for _ in range(7):
        x = torch.randn(8, 5, generator=g)
        step(ours, mine, x)
        step(ref, theirs, x)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    mine_sd, theirs_sd = mine.state_dict(), theirs.state_dict()
    assert mine_sd["param_groups"] == theirs_sd["param_groups"]
    assert set(mine_sd["state"]) == set(theirs_sd["state"]) == {0, 1}  # the unused layer has none
    for i, st in theirs_sd["state"].items():
        assert all(torch.equal(mine_sd["state"][i][k], st[k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    # Each loads the other's state and both go on in step.
    swapped_ours, swapped_ref = _two_layer(0), _two_layer(0)
    swapped_ours.load_state_dict(ours.state_dict())
    swapped_ref.load_state_dict(ref.state_dict())
    mine2 = ModuleAdam(swapped_ours.parameters(), AdamConfig(lr=0.03))
    mine2.load_state_dict(copy.deepcopy(theirs_sd))  # state_dict()s hold the live moments
    theirs2 = torch.optim.Adam(swapped_ref.parameters(), lr=0.03, foreach=False)
    theirs2.load_state_dict(copy.deepcopy(mine_sd))
    for _ in range(3):
        x = torch.randn(8, 5, generator=g)
        step(ours, mine, x)
        step(ref, theirs, x)
        step(swapped_ours, mine2, x)
        step(swapped_ref, theirs2, x)
    models = (ours, ref, swapped_ours, swapped_ref)
    for a, b, c, d in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_module_adam_refuses_a_foreign_state_and_keeps_its_own() -> None:
    model = _two_layer(0)
    opt = ModuleAdam(model.parameters(), AdamConfig(lr=0.1))
    model["used"](torch.ones(1, 5)).sum().backward()
    opt.step()
    kept = opt.state_dict()
    other = torch.optim.Adam(nn.Linear(5, 4).parameters(), lr=0.1)  # two parameters, not four
    bad_states = [
        {},
        {"state": {}, "param_groups": []},
        other.state_dict(),
        {**kept, "state": {0: {**kept["state"][0], "exp_avg": torch.zeros(3)}}},
        {**kept, "state": {9: kept["state"][0]}},
    ]
    for bad in bad_states:
        with pytest.raises(ValueError):
            opt.load_state_dict(bad)
        assert all(torch.equal(opt.state[i][k], kept["state"][i][k]) for i in kept["state"] for k in kept["state"][i])


def test_a_client_round_does_not_import_torch_compile_machinery() -> None:
    """torch.optim would import torch._dynamo, torch._inductor and sympy on its first optimiser
    (2 s and ~70 MiB in every edge node); a client's rounds must not."""
    script = (
        "import sys\n"
        "from fedgradnorm.client import LocalClient, load_omega_\n"
        "from fedgradnorm.simulation_config import SimulationConfig\n"
        "from fedgradnorm.simulator import Simulation\n"
        "sim = Simulation.build(SimulationConfig(federation='radcom', synthetic_size=4, rounds=2))\n"
        "for _ in sim.rounds(): pass\n"
        "heavy = sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
