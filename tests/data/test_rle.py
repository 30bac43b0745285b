import numpy as np
import pytest

from boxrefiner.data.rle import RLEError, decode_cvat_rle, encode_cvat_rle, mask_box, rle_box


def test_decode_hand_computed_runs():
    # box [10, 4, 13, 6]: 4 wide, 3 high; rows 0110 / 1111 / 0110
    mask, box = decode_cvat_rle([1, 2, 1, 4, 1, 2, 1, 10, 4, 13, 6])
    assert box == (10, 4, 13, 6)
    assert mask.tolist() == [[False, True, True, False], [True, True, True, True], [False, True, True, False]]


def test_decode_accepts_numbers_stored_as_string():
    a, _ = decode_cvat_rle("[1, 2, 1, 4, 1, 2, 1, 10, 4, 13, 6]")
    b, _ = decode_cvat_rle("1,2,1,4,1,2,1,10,4,13,6")
    assert a.tolist() == b.tolist() and a.sum() == 8


def test_runs_must_cover_the_box():
    with pytest.raises(RLEError, match="cover 11 pixels but the box has 4x3=12"):
        decode_cvat_rle([1, 2, 1, 4, 1, 2, 10, 4, 13, 6])


def test_box_outside_image_is_rejected():
    with pytest.raises(RLEError, match="outside the 12x20 image"):
        decode_cvat_rle([1, 2, 1, 4, 1, 2, 1, 10, 4, 13, 6], width=12, height=20)


@pytest.mark.parametrize("bad", ["1, two, 3, 4, 5", [1, -2, 3, 4, 5, 6], [1, 2]])
def test_malformed_values(bad):
    with pytest.raises(RLEError):
        decode_cvat_rle(bad)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    full = np.zeros((30, 40), bool)
    full[5:20, 8:31] = rng.random((15, 23)) > 0.4
    full[5, 8] = True  # foreground in the first box pixel: runs must start with a 0-length background run
    rle = encode_cvat_rle(full)
    assert rle[0] == 0
    mask, (left, top, right, bottom) = decode_cvat_rle(rle, 40, 30)
    rebuilt = np.zeros_like(full)
    rebuilt[top:bottom + 1, left:right + 1] = mask
    assert np.array_equal(rebuilt, full)
    assert mask_box(mask, (left, top)) == mask_box(full)


def _runs_over(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[int]:
    """CVAT runs of `mask` over a declared box that may be looser than its foreground."""
    left, top, right, bottom = box
    flat = mask[top:bottom + 1, left:right + 1].ravel().astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] if flat[0] else []) + runs + [left, top, right, bottom]


def test_the_box_from_runs_alone_equals_the_decoded_masks_box():
    rng = np.random.default_rng(1)
    cases = 0
    for _ in range(2000):
        height, width = rng.integers(2, 14, 2)
        full = rng.random((height, width)) < rng.uniform(0.0, 0.5)  # sparse: loose boxes, runs over row ends
        left, right = sorted(rng.integers(0, width, 2))
        top, bottom = sorted(rng.integers(0, height, 2))
        value = _runs_over(full, (left, top, right, bottom))
        mask, origin = decode_cvat_rle(value, width, height)
        assert rle_box(value, width, height) == mask_box(mask, origin[:2])
        cases += mask_box(mask, origin[:2]) not in (None, (left, top, right, bottom))
    assert cases > 500  # most declared boxes were looser than their foreground


def test_the_box_from_runs_checks_what_decoding_checks():
    assert rle_box([12, 10, 4, 13, 6]) is None  # only background
    with pytest.raises(RLEError, match="outside the 12x20 image"):
        rle_box([1, 2, 1, 4, 1, 2, 1, 10, 4, 13, 6], width=12, height=20)
    with pytest.raises(RLEError, match="cover 11 pixels"):
        rle_box([1, 2, 1, 4, 1, 2, 10, 4, 13, 6])
