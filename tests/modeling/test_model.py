import pytest
import torch

from boxrefiner.boxes import box_iou
from boxrefiner.modeling.head import BoxRefinementModule, Trajectory
from boxrefiner.modeling.losses import refinement_loss


def boxes():
    return torch.tensor([[0.2, 0.2, 0.6, 0.5], [0.1, 0.3, 0.4, 0.9]])


EXTENT = torch.tensor([[1.0, 0.75], [0.75, 1.0]])
def untrained(**kwargs) -> BoxRefinementModule:
    return BoxRefinementModule(hidden_dim=32, num_heads=4, roi_size=7, **kwargs)


def perturb(model: BoxRefinementModule, std: float) -> None:
    """Move the zero-initialised output layer, so that the head corrects boxes."""
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head[-1].weight, std=std)


@pytest.mark.parametrize("grid", [16, 64])
def test_any_grid_and_starts_as_identity(grid):
    model = untrained(max_iter=3)
    out = model(torch.randn(2, 256, grid, grid), boxes(), EXTENT)
    assert len(out.boxes) == 3 and all(o.shape == (2, 4) for o in out.boxes) and out.quality.shape == (4, 2)
    torch.testing.assert_close(out.boxes[-1], boxes(), atol=1e-6, rtol=0)  # zero-initialised output layers
    assert torch.allclose(out.iou_pred, torch.full((4, 2), 0.5))


def test_corrections_are_bounded_by_max_offset():
    model = untrained(max_offset=0.2, max_iter=1)
    perturb(model, 10.0)
    deltas, quality = model.look(torch.randn(2, 256, 16, 16), boxes())
    assert deltas.abs().max() <= 0.2 + 1e-6 and deltas.abs().max() > 0.05 and quality.shape == (2,)


def test_stop_threshold_freezes_converged_boxes():
    model = untrained(max_iter=4)
    perturb(model, 0.01)
    features = torch.randn(2, 256, 16, 16)
    moving = model(features, boxes(), EXTENT).boxes
    frozen = model(features, boxes(), EXTENT, stop_threshold=10.0).boxes  # every box stops after its first step
    torch.testing.assert_close(frozen[0], moving[0])
    torch.testing.assert_close(frozen[-1], frozen[0])
    assert not torch.allclose(moving[-1], moving[0])


def test_refined_boxes_stay_inside_the_image():
    model = untrained(max_offset=2.0, max_iter=3)
    perturb(model, 10.0)
    out = model(torch.randn(2, 256, 16, 16), boxes(), EXTENT).boxes[-1]
    assert (out >= 0).all() and (out[:, 2] <= EXTENT[:, 0] + 1e-6).all() and (out[:, 3] <= EXTENT[:, 1] + 1e-6).all()


def test_low_precision_features_are_sampled_like_grid_sample():
    model = untrained()
    features = torch.randn(2, 256, 16, 16)
    half = features.half()
    reference = model.sample_roi(half.float(), boxes())  # grid_sample on widened maps
    torch.testing.assert_close(model.sample_roi(half, boxes()), reference, rtol=0, atol=1e-5)
    outside = torch.tensor([[-0.3, -0.3, 0.1, 0.1], [0.9, 0.9, 1.4, 1.4]])  # zero padding beyond the grid
    torch.testing.assert_close(model.sample_roi(half, outside), model.sample_roi(half.float(), outside), rtol=0, atol=1e-5)


@pytest.mark.parametrize("context_layers", [0, 2])
def test_several_boxes_per_image_read_one_map_and_equal_copies(context_layers):
    model = untrained(max_iter=2, context_layers=context_layers, context_dim=16)
    perturb(model, 0.5)
    features = torch.randn(2, 256, 16, 16)
    many = torch.tensor([[0.2, 0.2, 0.6, 0.5], [0.25, 0.1, 0.5, 0.6], [0.1, 0.3, 0.4, 0.9], [0.0, 0.0, 0.3, 0.3]])
    grouped = model(features, many, EXTENT.repeat_interleave(2, 0), image_index=torch.tensor([0, 0, 1, 1]))
    uneven = model(features, many, EXTENT.repeat_interleave(2, 0), image_index=torch.tensor([0, 1, 1, 1]))
    copied = model(features.repeat_interleave(2, 0), many, EXTENT.repeat_interleave(2, 0))
    for a, b in zip(grouped.boxes, copied.boxes):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.quality, copied.quality, atol=1e-5, rtol=0)
    torch.testing.assert_close(uneven.boxes[-1][2:], copied.boxes[-1][2:], atol=1e-5, rtol=0)  # gather path
    alone = model(features[1:], many[1:2], EXTENT[:1]).boxes[-1][0]  # box 1 on map 1 (extent as given above)
    torch.testing.assert_close(uneven.boxes[-1][1], alone, atol=1e-5, rtol=0)


def trajectory() -> Trajectory:
    inputs = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    steps = [inputs + 0.1 * k for k in (1, 2)]
    logits = torch.logit(torch.tensor([[0.50, 0.80, 0.70],     # input
                                       [0.60, 0.79, 0.72],     # after iteration 1
                                       [0.55, 0.70, 0.75]]))   # after iteration 2
    return Trajectory(inputs, steps, logits)


def test_the_gate_keeps_the_input_unless_a_refined_box_is_predicted_better_by_the_margin():
    boxes, iou, chosen = trajectory().select(gate=True, keep_margin=0.0)
    assert chosen.tolist() == [1, 0, 2]  # box 0: iteration 1 is best; box 1: the input is best
    torch.testing.assert_close(iou, torch.tensor([0.60, 0.80, 0.75]))
    torch.testing.assert_close(boxes[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert trajectory().select(gate=True, keep_margin=0.07)[2].tolist() == [1, 0, 0]  # 0.75 < 0.70 + 0.07
    assert trajectory().select(gate=True, keep_margin=1.0)[2].tolist() == [0, 0, 0]
    last, iou, chosen = trajectory().select(gate=False)
    assert chosen.tolist() == [2, 2, 2] and torch.equal(last, trajectory().boxes[-1])
    assert Trajectory(torch.zeros(1, 4), [torch.ones(1, 4)], None).select(gate=True)[1] is None  # no quality head


def test_the_quality_loss_teaches_the_actual_iou_and_the_gain_over_the_input(seed=0):
    torch.manual_seed(seed)
    model = untrained(max_iter=2)
    features, target = torch.randn(2, 256, 16, 16), boxes()
    noisy = target + torch.tensor([[0.05, 0.0, 0.05, 0.0], [0.0, -0.05, 0.0, 0.1]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(250):  # boxes move (L1, GIoU) while the quality head learns
        loss = refinement_loss(model(features, noisy, EXTENT), target, 1.0, 1.0, 1.0, pair_weight=1.0)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    out = model(features, noisy, EXTENT)
    actual = torch.stack([box_iou(c, target) for c in out.candidates])
    assert loss.quality < 0.03 and torch.allclose(out.iou_pred, actual, atol=0.05)
    assert ((out.iou_pred[1:] - out.iou_pred[:1]) - (actual[1:] - actual[:1])).abs().max() < 0.05


def test_the_context_network_widens_what_a_box_sees_and_takes_low_precision_maps():
    torch.manual_seed(1)
    model = untrained(max_iter=1, context_layers=2, context_dim=16)
    perturb(model, 0.5)
    features = torch.randn(2, 256, 16, 16)
    box = torch.tensor([[0.40, 0.40, 0.60, 0.60]] * 2)  # sees cells 4-12 of 16 with its context
    far = features.clone()
    far[:, :, :, :2] += 5.0  # change columns 0-1 only: outside the box's view, inside the dilated field
    plain = untrained(max_iter=1)
    perturb(plain, 0.5)
    assert torch.equal(plain(features, box, EXTENT).boxes[0], plain(far, box, EXTENT).boxes[0])
    assert not torch.allclose(model(features, box, EXTENT).boxes[0], model(far, box, EXTENT).boxes[0])
    half = model(features.half(), box, EXTENT).boxes[0]  # cached float16 maps go through the same network
    torch.testing.assert_close(half, model(features.half().float(), box, EXTENT).boxes[0])


def test_maps_widened_once_give_what_forward_computes_itself():
    torch.manual_seed(2)
    model = untrained(max_iter=2, context_layers=2, context_dim=16)
    perturb(model, 0.5)
    features = torch.randn(2, 256, 16, 16)
    box = torch.tensor([[0.30, 0.35, 0.62, 0.70], [0.2, 0.2, 0.5, 0.6]])
    maps = model.context_maps(features)
    assert maps.shape == (2, 16, 16, 16) and not torch.equal(maps[:, :16], features[:, :16])
    once, itself = model(maps, box, EXTENT, widened=True), model(features, box, EXTENT)
    torch.testing.assert_close(torch.stack(once.boxes), torch.stack(itself.boxes), rtol=0, atol=0)
    torch.testing.assert_close(once.quality, itself.quality, rtol=0, atol=0)


def _stopped_in_the_loop(model: BoxRefinementModule, features, boxes, extent, threshold):
    """The early stop as earlier versions ran it: a converged box is frozen inside the loop and still
    looked at every iteration (the reference the one-pass `Trajectory.stopped` must equal)."""
    from boxrefiner.boxes import apply_deltas, clip_boxes
    maps = model.context_maps(features)
    active = torch.ones(len(boxes), dtype=torch.bool)
    iterations, quality = [], []
    for _ in range(model.max_iter):
        deltas, q = model.look(maps, boxes)
        refined = torch.where(active[:, None], clip_boxes(apply_deltas(boxes, deltas), extent), boxes)
        active = active & (deltas.abs().amax(dim=1) >= threshold)
        iterations.append(refined)
        quality.append(q)
        boxes = refined
    quality.append(model.look(maps, boxes)[1])
    return iterations, torch.stack(quality)


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.6, 1.0])
def test_one_pass_early_stop_equals_stopping_inside_the_loop(quantile):
    model = untrained(max_iter=4, context_layers=1).eval()
    perturb(model, 0.3)
    torch.manual_seed(1)
    features, start = torch.randn(6, 256, 16, 16), torch.rand(6, 2) * 0.4
    boxes = torch.cat([start, start + 0.2 + torch.rand(6, 2) * 0.3], dim=1)
    extent = torch.ones(6, 2)
    with torch.no_grad():
        full = model(features, boxes, extent)
        threshold = float(full.steps.quantile(quantile)) + 1e-6 * (quantile == 1.0)  # none, some, every box stops
        stopped = model(features, boxes, extent, stop_threshold=threshold)
        expected_boxes, expected_quality = _stopped_in_the_loop(model, features, boxes, extent, threshold)
    for got, want in zip(stopped.boxes, expected_boxes):
        assert torch.equal(got, want)
    assert torch.equal(stopped.quality, expected_quality)
    frozen = (full.steps < threshold).any(dim=0)
    assert int(frozen.sum()) == {0.0: 0, 1.0: 6}.get(quantile, int(frozen.sum())) and (quantile in (0.0, 1.0) or 0 < frozen.sum() < 6)
    assert torch.equal(full.rows(~frozen).boxes[-1], stopped.rows(~frozen).boxes[-1])  # the others run to the end
