"""Test helper: copy a FITS file HDU by HDU, changing or dropping some (for bad-input tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fitsio
import numpy as np

Edit = Callable[[np.ndarray], np.ndarray] | None


def rewrite_fits(src: Path, dst: Path, edits: dict[str, Edit]) -> Path:
    """Write ``dst`` as ``src`` with ``edits[EXTNAME](data)`` applied; None drops the HDU."""
    with fitsio.FITS(str(src)) as fin, fitsio.FITS(str(dst), "rw", clobber=True) as fout:
        for i, hdu in enumerate(fin):
            name = hdu.get_extname()
            header = hdu.read_header()
            if i == 0:
                fout.write(None, header=header)
                continue
            if name in edits and edits[name] is None:
                continue
            data = hdu.read()
            if name in edits:
                data = edits[name](data)
            fout.write(data, extname=name, header=header)
    return dst
