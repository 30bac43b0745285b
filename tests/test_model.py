import pytest
import torch

from boxrefiner.model import BoxRefinementModule


def boxes():
    return torch.tensor([[0.2, 0.2, 0.6, 0.5], [0.1, 0.3, 0.4, 0.9]])


EXTENT = torch.tensor([[1.0, 0.75], [0.75, 1.0]])


@pytest.mark.parametrize("grid", [16, 64])
def test_any_grid_and_starts_as_identity(grid):
    model = BoxRefinementModule(hidden_dim=32, num_heads=4, max_iter=3, roi_size=7)
    out = model(torch.randn(2, 256, grid, grid), boxes(), EXTENT)
    assert len(out) == 3 and all(o.shape == (2, 4) for o in out)
    torch.testing.assert_close(out[-1], boxes())  # zero-initialised last layer


def test_corrections_are_bounded_by_max_offset():
    model = BoxRefinementModule(hidden_dim=32, num_heads=4, max_offset=0.2, max_iter=1, roi_size=7)
    torch.nn.init.normal_(model.head[-1].weight, std=10.0)
    deltas = model.predict_deltas(torch.randn(2, 256, 16, 16), boxes())
    assert deltas.abs().max() <= 0.2 + 1e-6 and deltas.abs().max() > 0.1


def test_stop_threshold_freezes_converged_boxes():
    model = BoxRefinementModule(hidden_dim=32, num_heads=4, max_iter=4, roi_size=7)
    torch.nn.init.normal_(model.head[-1].weight, std=0.01)
    features = torch.randn(2, 256, 16, 16)
    moving = model(features, boxes(), EXTENT)
    frozen = model(features, boxes(), EXTENT, stop_threshold=10.0)  # every box stops after its first step
    torch.testing.assert_close(frozen[0], moving[0])
    torch.testing.assert_close(frozen[-1], frozen[0])
    assert not torch.allclose(moving[-1], moving[0])


def test_refined_boxes_stay_inside_the_image():
    model = BoxRefinementModule(hidden_dim=32, num_heads=4, max_offset=2.0, max_iter=3, roi_size=7)
    torch.nn.init.normal_(model.head[-1].weight, std=10.0)
    out = model(torch.randn(2, 256, 16, 16), boxes(), EXTENT)[-1]
    assert (out >= 0).all() and (out[:, 2] <= EXTENT[:, 0] + 1e-6).all() and (out[:, 3] <= EXTENT[:, 1] + 1e-6).all()


def test_low_precision_features_are_sampled_like_grid_sample():
    model = BoxRefinementModule(hidden_dim=32, num_heads=4, roi_size=7)
    features = torch.randn(2, 256, 16, 16)
    half = features.half()
    reference = model.sample_roi(half.float(), boxes())  # grid_sample on widened maps
    torch.testing.assert_close(model.sample_roi(half, boxes()), reference, rtol=0, atol=1e-5)
    outside = torch.tensor([[-0.3, -0.3, 0.1, 0.1], [0.9, 0.9, 1.4, 1.4]])  # zero padding beyond the grid
    torch.testing.assert_close(model.sample_roi(half, outside), model.sample_roi(half.float(), outside), rtol=0, atol=1e-5)
