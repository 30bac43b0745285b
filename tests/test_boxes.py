import pytest
import torch

from boxrefiner.boxes import (
    apply_deltas,
    box_iou,
    clip_boxes,
    generalized_box_iou,
    jitter_boxes,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("a,b,iou,giou", [
    ((0, 0, 2, 2), (0, 0, 2, 2), 1.0, 1.0),
    ((0, 0, 2, 2), (1, 0, 3, 2), 2 / 6, 2 / 6),            # half overlap: inter 2, union 6, enclosure = union
    ((0, 0, 1, 1), (2, 0, 3, 1), 0.0, -1 / 3),             # disjoint: enclosure 3, union 2
    ((0, 0, 4, 4), (1, 1, 2, 2), 1 / 16, 1 / 16),          # nested
    ((0, 0, 1, 1), (1, 1, 2, 2), 0.0, -0.5),               # corner touch: enclosure 4, union 2
])
def test_iou_and_giou_of_known_pairs(a, b, iou, giou):
    assert box_iou(t(a), t(b)).item() == pytest.approx(iou)
    assert generalized_box_iou(t(a), t(b)).item() == pytest.approx(giou)
    assert generalized_box_iou(t(b), t(a)).item() == pytest.approx(giou)


def test_apply_deltas_shifts_relative_to_box_size():
    out = apply_deltas(t((10, 10, 30, 50)), t((0.5, -0.25, 0.0, 0.0)))
    assert out.tolist() == [[20, 0, 40, 40]]
    grown = apply_deltas(t((10, 10, 30, 50)), torch.tensor([[0.0, 0.0, torch.log(torch.tensor(2.0)), 0.0]]))
    assert grown[0].tolist() == pytest.approx([0, 10, 40, 50])


def test_clip_keeps_boxes_inside_and_non_empty():
    out = clip_boxes(t((-5, -5, 50, 50), (9.9, 2, 20, 3)), t((10, 10), (10, 10)))
    assert out[0].tolist() == [0, 0, 10, 10]
    assert out[1, 2] <= 10 and out[1, 2] > out[1, 0]


def test_jitter_is_seeded_relative_and_clipped():
    boxes, extent = t((10, 10, 20, 20), (100, 100, 300, 300)), t((400, 400), (400, 400))
    a = jitter_boxes(boxes, extent, 0.1, 0.15, 2.5, torch.Generator().manual_seed(1))
    b = jitter_boxes(boxes, extent, 0.1, 0.15, 2.5, torch.Generator().manual_seed(1))
    c = jitter_boxes(boxes, extent, 0.1, 0.15, 2.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    many = jitter_boxes(t(*[(100, 100, 300, 300)] * 500), t(*[(400, 400)] * 500), 0.1, 0.15, 2.5,
                        torch.Generator().manual_seed(0))
    centre_shift = ((many[:, 0] + many[:, 2]) / 2 - 200).abs()
    assert centre_shift.max() <= 0.1 * 2.5 * 200 + 1e-3  # clipped at max_sigma, relative to the 200 px width
    assert 0.05 * 200 < centre_shift.std() * 1.6 < 0.2 * 200  # about 0.1 of the box width
    assert (many >= 0).all() and (many <= 400).all()


def test_hflip_mirrors_selected_rows_about_the_padded_square():
    from boxrefiner.boxes import hflip_boxes, hflip_extent
    boxes, flip = t((0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)), torch.tensor([True, False])
    out = hflip_boxes(boxes, flip)
    assert out[0].tolist() == pytest.approx([0.7, 0.2, 0.9, 0.4]) and out[1].tolist() == boxes[1].tolist()
    assert torch.allclose(hflip_boxes(out, flip), boxes)
    assert hflip_extent(t((0.75, 1.0), (0.75, 1.0)), flip).tolist() == [[1.0, 1.0], [0.75, 1.0]]
