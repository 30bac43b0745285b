import numpy as np
import pytest

from boxrefiner.data.rle import RLEError, decode_cvat_rle, encode_cvat_rle, mask_box


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
