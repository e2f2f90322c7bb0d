"""Write ``inference/digits.npz``: scikit-learn's bundled 8x8 digits as the package ships them.

The file holds the raw data, not a processed split: ``images`` ``(1797, 8, 8)`` uint8 intensities
in 0..16 and ``target`` ``(1797,)`` uint8 labels, exactly scikit-learn's ``load_digits()`` values
(the UCI "Optical Recognition of Handwritten Digits" test set, as bundled in scikit-learn, BSD-3).
:func:`inference.data.load_digits` scales, binarizes and splits them with its fixed seed, so
the data a run sees are the same as when it read scikit-learn's copy
(``tests/inference/test_data.py`` checks that against scikit-learn when it is installed).

Run once: ``python scripts/make_digits.py`` (needs scikit-learn).
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "inference" / "digits.npz"


def main() -> None:
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    target = bunch.target.astype(np.uint8)
    # lossless: integer intensities 0..16 and labels 0..9
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)
    np.savez_compressed(OUT, images=images, target=target)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): images {images.shape}, target {target.shape}")


if __name__ == "__main__":
    main()
