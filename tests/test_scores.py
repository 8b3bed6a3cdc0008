"""Label-free scores (sparse_repair.evaluate.label_free_scores): what selection chooses by and
what run rows record with RunConfig.scoring > 0."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_repair.evaluate import label_free_scores, predict_logits


def test_identical_logits_agree_fully_with_zero_kl():
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    assert label_free_scores(z, z) == {"agreement": 100.0, "kl": 0.0}


def test_agreement_and_kl_against_hand_computed_values():
    dense = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    pruned = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    s = label_free_scores(pruned, dense)
    # image 0: dense argmax 0, pruned ties -> argmax 0 (first); image 1: both 1.
    assert s["agreement"] == 100.0
    p = torch.softmax(dense.double(), 1)
    q = torch.softmax(pruned.double(), 1)
    expected = float((p * (p.log() - q.log())).sum(1).mean())
    assert math.isclose(s["kl"], expected, rel_tol=1e-12)
    assert s["kl"] > 0
    flipped = label_free_scores(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), dense)
    assert flipped["agreement"] == 50.0


def test_kl_is_from_the_dense_softmax():
    """KL(p_dense || p_pruned), not the reverse: the two differ on asymmetric inputs."""
    dense = torch.tensor([[3.0, 0.0, 0.0]])
    pruned = torch.tensor([[1.0, 1.0, 0.0]])
    p, q = torch.softmax(dense.double(), 1), torch.softmax(pruned.double(), 1)
    forward = float((p * (p / q).log()).sum())
    reverse = float((q * (q / p).log()).sum())
    assert abs(forward - reverse) > 1e-3
    assert math.isclose(label_free_scores(pruned, dense)["kl"], forward, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [torch.randn(3, 10), torch.randn(4, 9), torch.randn(4),
                                 torch.randn(0, 10), torch.randn(4, 0)])
def test_shape_mismatch_is_refused(bad):
    with pytest.raises(ValueError, match="same shape"):
        label_free_scores(bad, bad if bad.numel() == 0 else torch.randn(4, 10))


def test_non_finite_logits_are_refused_never_scored_as_nan():
    z = torch.randn(4, 10)
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        label_free_scores(bad, z)


def test_predict_logits_restores_the_mode_and_chunks_consistently():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5),
                                torch.nn.BatchNorm1d(5))
    model.train()
    x = torch.randn(10, 3, 2, 2)
    a = predict_logits(model, x, batch_size=3)
    assert model.training, "the model's mode was not restored"
    assert a.shape == (10, 5) and a.dtype == torch.float32
    assert torch.allclose(a, predict_logits(model, x, batch_size=10), atol=1e-6)


def test_run_rows_record_label_free_scores_only_when_asked():
    from pathlib import Path

    from sparse_repair.run import RunConfig, run_single
    from sparse_repair.weights import load_trained

    ckpt = str(Path(__file__).resolve().parents[1] / "baselines" / "checkpoints" /
               "resnet8-digits.pt")
    dense = load_trained(ckpt)[0]
    base = dict(model="resnet8", dataset="digits", weights=ckpt, calib=128, n_eval=200,
                repairs=["none", "bn_recal"])
    off = run_single(RunConfig(**base, sparsity=0.8), dense=dense)
    assert all(r["agreement"] is None and r["kl"] is None for r in off)
    on = run_single(RunConfig(**base, sparsity=0.8, scoring=300), dense=dense)
    assert [r["top1"] for r in on] == [r["top1"] for r in off], "scoring changed the repair"
    for r in on:
        assert 0.0 <= r["agreement"] <= 100.0 and r["kl"] >= 0.0
    # At sparsity 0 the pruned model is the dense model: full agreement, zero KL.
    (same,) = run_single(RunConfig(**{**base, "repairs": ["none"]}, sparsity=0.0, scoring=300),
                         dense=dense)
    assert same["agreement"] == 100.0 and same["kl"] < 1e-9


def test_non_tensor_logits_are_a_type_error():
    with pytest.raises(TypeError, match="torch tensors"):
        label_free_scores([[0.0, 1.0]], torch.zeros(1, 2))


def test_integer_logits_are_a_type_error():
    """Class indices are not logits: there is no softmax to compare, so no KL to report."""
    with pytest.raises(TypeError, match="floating-point"):
        label_free_scores(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_bad_inputs_are_refused_clearly_and_grads_are_dropped():
    """Meta or split devices, a non-bool per_image and float64 logits whose KL overflows get a
    ValueError/TypeError naming the problem (never NaN, never a cryptic .item() error); logits
    that require grad are scored without an autograd graph."""
    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match="meta device"):
        label_free_scores(torch.empty(4, 10, device="meta"), z)
    with pytest.raises(TypeError, match="per_image must be True or False"):
        label_free_scores(z, z, per_image="yes")
    far = torch.tensor([[1e308, -1e308]], dtype=torch.float64)
    for a, b in ((far, -far), (torch.zeros_like(far), far)):
        with pytest.raises(ValueError, match="overflows float64"):
            label_free_scores(a, b)
    s = label_free_scores(z.clone().requires_grad_(), z + 1, per_image=True)
    assert not s["per_image"]["kl"].requires_grad and s["agreement"] == 100.0


def test_a_run_keeps_the_row_of_a_repair_whose_logits_are_not_finite(monkeypatch):
    """A collapsed repair (NaN logits on the scoring images) is stored with its top-1 and no
    label-free score, with a warning; the run does not fail and lose the other rows."""
    from pathlib import Path

    import sparse_repair.run as run_mod
    from sparse_repair.weights import load_trained

    ckpt = str(Path(__file__).resolve().parents[1] / "baselines" / "checkpoints" /
               "resnet8-digits.pt")
    dense = load_trained(ckpt)[0]
    real = run_mod.predict_logits
    calls = []

    def nan_after_dense(model, images, *a, **k):  # the first call is the dense model's
        out = real(model, images, *a, **k)
        calls.append(1)
        return out if len(calls) == 1 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(run_mod, "predict_logits", nan_after_dense)
    cfg = run_mod.RunConfig(model="resnet8", dataset="digits", weights=ckpt, calib=128,
                            n_eval=200, repairs=["none", "bn_recal"], sparsity=0.8, scoring=300)
    with pytest.warns(RuntimeWarning, match="not finite"):
        rows = run_mod.run_single(cfg, dense=dense)
    assert [r["repair"] for r in rows] == ["none", "bn_recal"]
    assert all(r["agreement"] is None and r["kl"] is None and r["top1"] >= 0 for r in rows)
