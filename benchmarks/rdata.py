"""A minimal reader of R's serialization format, enough for the text vectors of an R data package.

R packages keep their data sets in `data/Rdata.rdb` (records: a 4-byte big-endian length of the uncompressed
payload, then a zlib stream) indexed by `data/Rdata.rdx` (a gzipped serialization of
`list(variables = list(name = c(offset, length)), ...)`). Each payload is an XDR serialization (`"X\\n"` header).
Only the types such files use are read: NULL, symbols, pairlists, strings, logical/integer/double vectors and
lists (a `names` attribute turns a vector into a dict). Anything else raises `ValueError`. Stdlib only.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

# SEXP type codes (R Internals, "Serialization formats").
NILVALUE, REF = 254, 255
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 1, 2, 9, 10, 13, 14, 16, 19, 20
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


class RReader:
    """Reads one object from an XDR ("X") serialization, versions 2 and 3."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (expected the 'X\\n' header)")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # oldest R version that can read it
        if version == 3:
            encoding_length = self._int()
            self.pos += encoding_length  # skip the native encoding name

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _flags(self) -> tuple[int, int, int, int]:
        flags = self._int()
        return flags, flags & 0xFF, flags & HAS_ATTR, flags & HAS_TAG

    def read(self):
        flags, kind, has_attr, has_tag = self._flags()
        return self._body(flags, kind, has_attr, has_tag)

    def _body(self, flags: int, kind: int, has_attr: int, has_tag: int):
        if kind == NILVALUE:
            return None
        if kind == REF:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.read()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            length = self._int()
            if length == -1:
                return None  # NA_character_
            text = self.data[self.pos : self.pos + length].decode("utf-8", errors="replace")
            self.pos += length
            return text
        if kind == LISTSXP:  # a pairlist: tagged cells until NULL -> dict
            cells = {}
            while kind == LISTSXP:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                cells[tag if tag is not None else len(cells)] = self.read()
                flags, kind, has_attr, has_tag = self._flags()
            if kind != NILVALUE:
                raise ValueError(f"malformed pairlist (ends with type {kind})")
            return cells
        if kind in (LGLSXP, INTSXP):
            n = self._int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == REALSXP:
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (STRSXP, VECSXP, EXPRSXP):
            value = [self.read() for _ in range(self._int())]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attributes = self.read()
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value))
        return value


def read_rdata(data_dir: str | Path) -> dict:
    """Every object of an R package's `data/` folder (`Rdata.rdx` + `Rdata.rdb`), by name."""
    data_dir = Path(data_dir)
    index = RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise ValueError(f"{data_dir / 'Rdata.rdx'} has no 'variables' index")
    blob = (data_dir / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in variables.items():
        record = blob[offset : offset + length]
        (expected,) = struct.unpack_from(">I", record)
        payload = zlib.decompress(record[4:])
        if len(payload) != expected:
            raise ValueError(f"record {name!r} is corrupt ({len(payload)} bytes, header says {expected})")
        objects[name] = RReader(payload).read()
    return objects
