"""OME-NGFF versions for writing: NGFF 0.4 on Zarr v2 and NGFF 0.5 on Zarr v3, one class each.

A format knows everything that differs between the versions, so writers never compare version
strings:

- how to create a group and an array: Zarr v2 with ``"/"`` chunk keys (0.4) or Zarr v3 with
  ``dimension_names`` (0.5), both Blosc-lz4 with byte shuffle and fill value 0 (what every Blosc
  build decodes, including the Java readers QuPath uses);
- where the NGFF metadata lives: the group's top-level attributes in ``.zattrs`` (0.4) or under
  ``ome`` in the ``attributes`` of ``zarr.json``, next to ``"version": "0.5"`` (0.5);
- where each piece of metadata (multiscales, omero, image-label, plate, well) carries its
  version: inside the piece (0.4) or only once, under ``ome`` (0.5).

>>> fmt = ngff_format("0.5")
>>> fmt.attrs({"labels": ["cells"]})
{'ome': {'version': '0.5', 'labels': ['cells']}}

Reading OME-Zarr images (all versions from 0.1) is :mod:`simsearch_wsi.io.omezarr`'s business.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError

__all__ = [
    "NGFF_FORMATS",
    "Ngff04",
    "Ngff05",
    "NgffFormat",
    "NgffVersion",
    "ngff_format",
]

NgffVersion = Literal["0.4", "0.5"]

# Blosc with lz4 inside and byte shuffle, level 5.
_BLOSC_CNAME: Literal["lz4"] = "lz4"
_BLOSC_LEVEL = 5


class NgffFormat(ABC):
    """One NGFF version as written by this project (subclasses: :class:`Ngff04`, :class:`Ngff05`).

    Metadata builders take the version-free content of a piece of metadata and return it as the
    version stores it; :meth:`attrs` wraps a group's NGFF attributes the same way.
    """

    version: ClassVar[NgffVersion]
    zarr_format: ClassVar[Literal[2, 3]]
    # the JSON file that holds a group's attributes, and the file that marks a Zarr group
    attrs_file_name: ClassVar[str]
    group_file_name: ClassVar[str]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # --- Zarr groups and arrays -------------------------------------------------------------
    def create_group(self, path: str | os.PathLike[str]) -> Any:
        """A new, empty Zarr group of this version's Zarr format at ``path`` (replacing it)."""
        import zarr

        return zarr.open_group(path, mode="w", zarr_format=self.zarr_format)

    def write_array(
        self,
        group: Any,
        key: str,
        *,
        data: NDArray[Any],
        chunks: Sequence[int],
        dimension_names: Sequence[str],
    ) -> None:
        """Create array ``key`` of ``group`` (Blosc-lz4, fill 0) and write ``data`` to it.

        ``chunks`` is clipped to the array's shape (at least 1); ``dimension_names`` are stored
        where the Zarr format has them (v3).
        """
        clipped = tuple(max(1, min(c, s)) for c, s in zip(chunks, data.shape, strict=True))
        arr = group.create_array(
            key,
            shape=data.shape,
            chunks=clipped,
            dtype=data.dtype,
            fill_value=0,
            **self._array_options(tuple(dimension_names)),
        )
        arr[...] = data

    @abstractmethod
    def _array_options(self, dimension_names: tuple[str, ...]) -> dict[str, Any]:
        """Compressor and chunk-key or dimension-name options of ``create_array``."""
        raise NotImplementedError

    # --- where the metadata lives -----------------------------------------------------------
    @abstractmethod
    def attrs(self, ngff: Mapping[str, Any]) -> dict[str, Any]:
        """Group attributes holding the NGFF metadata ``ngff`` (e.g. ``{"multiscales": ...}``)."""
        raise NotImplementedError

    @abstractmethod
    def ngff_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The NGFF metadata inside a group's attributes (the inverse of :meth:`attrs`)."""
        raise NotImplementedError

    def write_attrs(self, group: Any, ngff: Mapping[str, Any]) -> None:
        """Add the NGFF metadata ``ngff`` to the attributes of the Zarr ``group`` (all of it in
        one call: for 0.5 a second call replaces the ``ome`` attribute)."""
        group.attrs.update(self.attrs(ngff))

    def attrs_file(self, group_dir: Path) -> Path:
        """The JSON file that holds the attributes of the group folder ``group_dir``."""
        return group_dir / self.attrs_file_name

    def group_file(self, group_dir: Path) -> Path:
        """The file whose presence makes ``group_dir`` a Zarr group of this format."""
        return group_dir / self.group_file_name

    @abstractmethod
    def document_ngff(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The NGFF metadata inside the parsed JSON of :meth:`attrs_file` (read-only use)."""
        raise NotImplementedError

    @abstractmethod
    def editable_document_ngff(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The NGFF metadata dict inside the parsed JSON of :meth:`attrs_file`, created when
        missing; changes to it change ``doc``."""
        raise NotImplementedError

    # --- metadata pieces --------------------------------------------------------------------
    @abstractmethod
    def _in_piece(self, content: Mapping[str, Any], *, last: bool = False) -> dict[str, Any]:
        """``content`` with the version inside it where this version wants it (first, or
        ``last``)."""
        raise NotImplementedError

    def multiscale(
        self,
        *,
        name: str,
        axes: Sequence[Mapping[str, Any]],
        transforms: Sequence[Sequence[Mapping[str, Any]]],
        type_: str,
        metadata: Mapping[str, Any],
    ) -> dict[str, Any]:
        """One ``multiscales`` entry: dataset ``k`` is the array at path ``"k"`` with
        ``transforms[k]`` as its coordinate transformations."""
        return self._in_piece(
            {
                "name": name,
                "axes": list(axes),
                "datasets": [
                    {"path": str(k), "coordinateTransformations": t}
                    for k, t in enumerate(transforms)
                ],
                "type": type_,
                "metadata": dict(metadata),
            }
        )

    def omero(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The ``omero`` rendering metadata (channels, rdefs)."""
        return self._in_piece(content)

    def image_label(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The ``image-label`` metadata of a label image (colors, properties, source)."""
        return self._in_piece(content, last=True)

    def plate(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The ``plate`` metadata of an HCS plate (name, rows, columns, wells, ...)."""
        return self._in_piece(content)

    def well(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The ``well`` metadata of a plate well (its field images)."""
        return self._in_piece(content)

    @abstractmethod
    def validation_models(self) -> ModuleType:
        """The ``ome_zarr_models`` module that validates this version (``v04`` or ``v05``)."""
        raise NotImplementedError


class Ngff04(NgffFormat):
    """NGFF 0.4 on Zarr v2: ``"/"`` chunk keys, metadata (each piece versioned) in ``.zattrs``."""

    version = "0.4"
    zarr_format = 2
    attrs_file_name = ".zattrs"
    group_file_name = ".zgroup"

    def _array_options(self, dimension_names: tuple[str, ...]) -> dict[str, Any]:
        import numcodecs

        return {
            "compressors": numcodecs.Blosc(
                cname=_BLOSC_CNAME, clevel=_BLOSC_LEVEL, shuffle=numcodecs.Blosc.SHUFFLE
            ),
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
        }

    def attrs(self, ngff: Mapping[str, Any]) -> dict[str, Any]:
        return dict(ngff)

    def ngff_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        return dict(attrs)

    def document_ngff(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        return dict(doc)

    def editable_document_ngff(self, doc: dict[str, Any]) -> dict[str, Any]:
        return doc

    def _in_piece(self, content: Mapping[str, Any], *, last: bool = False) -> dict[str, Any]:
        if last:
            return {**content, "version": self.version}
        return {"version": self.version, **content}

    def validation_models(self) -> ModuleType:
        import ome_zarr_models.v04

        return ome_zarr_models.v04


class Ngff05(NgffFormat):
    """NGFF 0.5 on Zarr v3: ``dimension_names``, metadata under ``ome`` (with the version once)
    in the ``attributes`` of ``zarr.json``."""

    version = "0.5"
    zarr_format = 3
    attrs_file_name = "zarr.json"
    group_file_name = "zarr.json"

    def _array_options(self, dimension_names: tuple[str, ...]) -> dict[str, Any]:
        import zarr.codecs

        return {
            "compressors": zarr.codecs.BloscCodec(
                cname=_BLOSC_CNAME, clevel=_BLOSC_LEVEL, shuffle="shuffle"
            ),
            "dimension_names": dimension_names,
        }

    def attrs(self, ngff: Mapping[str, Any]) -> dict[str, Any]:
        return {"ome": {"version": self.version, **ngff}}

    def ngff_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        ome = attrs.get("ome")
        return dict(ome) if isinstance(ome, Mapping) else {}

    def document_ngff(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        attributes = doc.get("attributes")
        return self.ngff_attrs(attributes) if isinstance(attributes, Mapping) else {}

    def editable_document_ngff(self, doc: dict[str, Any]) -> dict[str, Any]:
        ome: dict[str, Any] = doc.setdefault("attributes", {}).setdefault(
            "ome", {"version": self.version}
        )
        ome.setdefault("version", self.version)
        return ome

    def _in_piece(self, content: Mapping[str, Any], *, last: bool = False) -> dict[str, Any]:
        return dict(content)

    def validation_models(self) -> ModuleType:
        import ome_zarr_models.v05

        return ome_zarr_models.v05


# The versions this project writes, by version string.
NGFF_FORMATS: Mapping[str, NgffFormat] = {f.version: f for f in (Ngff04(), Ngff05())}


def ngff_format(version: str) -> NgffFormat:
    """The format that writes NGFF ``version`` ("0.4" or "0.5").

    Raises
    ------
    ConfigError
        any other version.
    """
    fmt = NGFF_FORMATS.get(version) if isinstance(version, str) else None
    if fmt is None:
        known = " or ".join(repr(v) for v in NGFF_FORMATS)
        raise ConfigError(f"OME-Zarr version must be {known}, got {version!r}")
    return fmt
