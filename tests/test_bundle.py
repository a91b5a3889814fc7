from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from simsearch_wsi.core.errors import SimSearchError
from simsearch_wsi.features import backbones
from simsearch_wsi.features.backbones import BackboneSpec, build_trunk
from simsearch_wsi.features.preprocess import ChannelNormalization
from simsearch_wsi.search.similarity import PatchGeometry
from simsearch_wsi.train.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    BundleError,
    BundleNotFoundError,
    ModelBundle,
    load_bundle,
    save_bundle,
)

CLASSES = ("tumor", "stroma", "background")


@pytest.fixture(scope="module")
def trunk() -> nn.Module:
    module, _, _ = build_trunk("resnet18-l3", "random", seed=0)
    return module


def make_bundle(trunk: nn.Module, **changes: Any) -> ModelBundle:
    gen = torch.Generator().manual_seed(1)
    norm = ChannelNormalization(
        (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), ("R", "G", "B"), "fixed-range"
    )
    fields: dict[str, Any] = {
        "backbone": "resnet18-l3",
        "trunk_state": dict(trunk.state_dict()),
        "head_weight": torch.randn(3, 256, generator=gen),
        "head_bias": torch.randn(3, generator=gen),
        "classes": CLASSES,
        "colors": {"tumor": (200, 0, 0), "stroma": (0, 150, 50), "background": (255, 255, 255)},
        "thresholds": {"tumor": 0.8, "stroma": 0.5},
        "patch_size_l0": (96.0, 64.0),
        "mpp": 0.25,
        "analysis_downsample": 2.0,
        "context_a": 32,
        "geometry": PatchGeometry(48.0, 32.0, 16).to_dict(),
        "normalization": norm.to_dict(),
        "channels": ("R", "G", "B"),
        "rgb": True,
        "strategy": "pos+neg+selflearn",
        "config": {"epochs": 3, "lr": 1e-3, "classes": list(CLASSES)},
        "metrics": {"val_accuracy": 0.91, "per_class": {"tumor": {"f1": 0.9}}},
        "provenance": {"weights": "random:seed0", "session": "s1"},
    }
    fields.update(changes)
    return ModelBundle(**fields)


@pytest.fixture(scope="module")
def bundle(trunk: nn.Module) -> ModelBundle:
    return make_bundle(trunk)


@pytest.fixture(scope="module")
def saved(bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle(tmp_path_factory.mktemp("bundle") / "model.simsearch", bundle)


@pytest.fixture()
def copy(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved bundle to damage."""
    return Path(shutil.copyfile(saved, tmp_path / "model.simsearch"))


def rewrite(path: Path, edit: Callable[[dict[str, bytes]], object]) -> None:
    """Rewrite the zip at ``path`` after ``edit`` changes its {member: bytes}."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def edit_json(path: Path, **changes: Any) -> None:
    def edit(members: dict[str, bytes]) -> None:
        meta = json.loads(members["bundle.json"])
        meta.update(changes)
        members["bundle.json"] = json.dumps(meta).encode()

    rewrite(path, edit)


def edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """Change the tensors of weights.pt and keep bundle.json's checksum consistent."""
    import hashlib
    import io

    def change(members: dict[str, bytes]) -> None:
        tensors = torch.load(io.BytesIO(members["weights.pt"]), weights_only=True)
        edit(tensors)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        members["weights.pt"] = buf.getvalue()
        meta = json.loads(members["bundle.json"])
        meta["weights_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        members["bundle.json"] = json.dumps(meta).encode()

    rewrite(path, change)


# --- round trip -------------------------------------------------------------------------------
def test_round_trip_keeps_every_field_and_tensor(bundle: ModelBundle, saved: Path) -> None:
    loaded = load_bundle(saved)
    skip = {"trunk_state", "head_weight", "head_bias", "versions", "created", "source"}
    for f in dataclasses.fields(ModelBundle):
        if f.name not in skip:
            assert getattr(loaded, f.name) == getattr(bundle, f.name), f.name
    assert torch.equal(loaded.head_weight, bundle.head_weight)
    assert torch.equal(loaded.head_bias, bundle.head_bias)
    assert loaded.trunk_state.keys() == bundle.trunk_state.keys()
    for k, v in bundle.trunk_state.items():
        assert loaded.trunk_state[k].dtype == v.dtype
        assert torch.equal(loaded.trunk_state[k], v), k
    assert isinstance(loaded.classes, tuple)
    assert isinstance(loaded.patch_size_l0, tuple)
    assert loaded.colors["tumor"] == (200, 0, 0)
    assert loaded.source == saved
    # filled by save_bundle, not by the caller
    assert bundle.versions == {} and bundle.created == ""
    assert set(loaded.versions) == {"simsearch_wsi", "torch", "torchvision", "numpy", "python"}
    assert loaded.versions["torch"] == torch.__version__
    assert loaded.created.endswith("+00:00") and "T" in loaded.created


def test_saving_a_loaded_bundle_again_gives_the_same_bytes(saved: Path, tmp_path: Path) -> None:
    again = save_bundle(tmp_path / "again.simsearch", load_bundle(saved))
    assert again.read_bytes() == saved.read_bytes()


def test_rebuilt_trunk_and_head_compute_the_same(
    trunk: nn.Module, bundle: ModelBundle, saved: Path
) -> None:
    loaded = load_bundle(saved)
    rng_before = torch.random.get_rng_state()
    rebuilt, spec = loaded.build_trunk()
    head = loaded.head()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert spec.name == "resnet18-l3"
    assert not rebuilt.training and not head.training
    assert all(not p.requires_grad for p in [*rebuilt.parameters(), *head.parameters()])
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = trunk(x)
        got = rebuilt(x)
        assert torch.equal(got, expected)
        pooled = got.mean(dim=(2, 3))
        assert torch.equal(head(pooled), pooled @ bundle.head_weight.T + bundle.head_bias)


def test_file_is_a_zip_with_readable_metadata(bundle: ModelBundle, saved: Path) -> None:
    with zipfile.ZipFile(saved) as zf:
        assert sorted(zf.namelist()) == ["bundle.json", "weights.pt"]
        assert zf.getinfo("weights.pt").compress_type == zipfile.ZIP_STORED
        meta = json.loads(zf.read("bundle.json"))
    assert meta["format"] == BUNDLE_FORMAT == "simsearch-wsi-model"
    # a model without a partner is still written as version 2 (head_input, feature_norm), so
    # older releases read it; 3 adds the partner model, 4 its similarity expert (issue 27)
    assert meta["version"] == 2 and BUNDLE_VERSION == 4
    assert len(meta["weights_sha256"]) == 64
    assert meta["classes"] == list(CLASSES)
    assert meta["patch_size_um"] == [24.0, 16.0]
    assert meta["analysis_mpp"] == 0.5
    assert "trunk_state" not in meta and "head_weight" not in meta
    assert bundle.to_json_dict().keys() == meta.keys() - {"weights_sha256"}


def test_derived_quantities(trunk: nn.Module, bundle: ModelBundle) -> None:
    assert bundle.n_classes == 3 and bundle.feature_dim == 256
    assert bundle.patch_size_um == (24.0, 16.0)
    assert bundle.analysis_mpp == 0.5
    unknown = make_bundle(trunk, mpp=None)
    assert unknown.patch_size_um is None and unknown.analysis_mpp is None
    assert bundle.channel_normalization().channel_names == ("R", "G", "B")


def test_numpy_scalars_become_builtin_numbers(trunk: nn.Module, tmp_path: Path) -> None:
    import numpy as np

    b = make_bundle(
        trunk,
        mpp=np.float32(0.5),
        thresholds={"tumor": np.float32(0.25)},
        context_a=np.int64(3),
        patch_size_l0=np.array([10.0, 20.0]),
    )
    assert type(b.mpp) is float and type(b.context_a) is int
    assert b.patch_size_l0 == (10.0, 20.0) and type(b.patch_size_l0[0]) is float
    assert type(b.thresholds["tumor"]) is float
    assert load_bundle(save_bundle(tmp_path / "np.simsearch", b)).thresholds == {"tumor": 0.25}


def test_describe_has_the_key_fields(saved: Path) -> None:
    info = load_bundle(saved).describe()
    assert info["classes"] == [
        {"name": "tumor", "color": [200, 0, 0], "threshold": 0.8},
        {"name": "stroma", "color": [0, 150, 50], "threshold": 0.5},
        {"name": "background", "color": [255, 255, 255], "threshold": None},
    ]
    assert info["backbone"] == "resnet18-l3"
    assert info["patch_size_l0"] == [96.0, 64.0] and info["patch_size_um"] == [24.0, 16.0]
    assert info["analysis_mpp"] == 0.5
    assert info["channels"] == ["R", "G", "B"]
    assert info["strategy"] == "pos+neg+selflearn"
    assert info["metrics"] == {"val_accuracy": 0.91}  # scalars only
    assert info["versions"]["torch"] == torch.__version__ and info["created"]
    assert info["source"] == str(saved)
    json.dumps(info, allow_nan=False)


# --- atomic writes ----------------------------------------------------------------------------
def test_failed_save_leaves_no_file_and_keeps_the_previous_one(
    trunk: nn.Module, bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.simsearch"
    save_bundle(target, bundle)
    previous = target.read_bytes()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(target, make_bundle(trunk, strategy="other"))
    assert target.read_bytes() == previous
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(tmp_path / "new.simsearch", bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.simsearch"]


def test_failure_while_writing_the_zip_leaves_no_temporary(
    bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    with pytest.raises(OSError, match="no space"):
        save_bundle(tmp_path / "model.simsearch", bundle)
    assert list(tmp_path.iterdir()) == []


# --- damaged or foreign files -----------------------------------------------------------------
def assert_bundle_error(path: Path, *hints: str) -> BundleError:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for hint in hints:
        assert hint in message
    return info.value


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.simsearch"
    with pytest.raises(BundleNotFoundError, match="not found") as info:
        load_bundle(path)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, SimSearchError) and isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def test_folder_is_refused(tmp_path: Path) -> None:
    assert_bundle_error(tmp_path, "folder")


def test_truncated_file(copy: Path) -> None:
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    assert_bundle_error(copy, "truncated", "copy the file again")


def test_random_bytes(copy: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    copy.write_bytes(torch.randint(0, 256, (4096,), generator=gen).byte().numpy().tobytes())
    assert_bundle_error(copy, "not a zip archive", "simsearch-wsi train")


def test_newer_version(copy: Path) -> None:
    edit_json(copy, version=99)
    assert_bundle_error(copy, "newer simsearch_wsi", "upgrade")


@pytest.mark.parametrize("version", [0, "1", None])
def test_unknown_version(copy: Path, version: object) -> None:
    edit_json(copy, version=version)
    assert_bundle_error(copy, "version")


def test_other_format(copy: Path) -> None:
    edit_json(copy, format="something-else")
    assert_bundle_error(copy, "not a simsearch-wsi model bundle", "'something-else'")


def test_metadata_not_json(copy: Path) -> None:
    def edit(members: dict[str, bytes]) -> None:
        members["bundle.json"] = members["bundle.json"][:-20]

    rewrite(copy, edit)
    assert_bundle_error(copy, "not valid JSON")


def test_weights_changed_after_save_fail_the_checksum(copy: Path) -> None:
    def edit(members: dict[str, bytes]) -> None:
        data = bytearray(members["weights.pt"])
        data[len(data) // 2] ^= 0xFF
        members["weights.pt"] = bytes(data)

    rewrite(copy, edit)  # a consistent zip (new CRC) whose weights no longer match bundle.json
    assert_bundle_error(copy, "weights checksum mismatch", "copy the file again")


def test_flipped_byte_in_the_file(copy: Path) -> None:
    data = bytearray(copy.read_bytes())
    with zipfile.ZipFile(copy) as zf:
        info = zf.getinfo("weights.pt")
    data[info.header_offset + 4096] ^= 0xFF  # inside the stored weights
    copy.write_bytes(bytes(data))
    assert_bundle_error(copy, "corrupt", "copy the file again")


@pytest.mark.parametrize("member", ["bundle.json", "weights.pt"])
def test_missing_member(copy: Path, member: str) -> None:
    rewrite(copy, lambda members: members.pop(member))
    assert_bundle_error(copy, f"{member!r} is missing")


def test_missing_metadata_key(copy: Path) -> None:
    def edit(members: dict[str, bytes]) -> None:
        meta = json.loads(members["bundle.json"])
        del meta["patch_size_l0"]
        members["bundle.json"] = json.dumps(meta).encode()

    rewrite(copy, edit)
    assert_bundle_error(copy, "lacks ['patch_size_l0']")


def test_weights_that_are_not_a_torch_file(copy: Path) -> None:
    import hashlib

    def edit(members: dict[str, bytes]) -> None:
        members["weights.pt"] = b"not a pickle"
        meta = json.loads(members["bundle.json"])
        meta["weights_sha256"] = hashlib.sha256(b"not a pickle").hexdigest()
        members["bundle.json"] = json.dumps(meta).encode()

    rewrite(copy, edit)
    assert_bundle_error(copy, "weights.pt cannot be loaded")


def test_missing_head_tensor(copy: Path) -> None:
    edit_weights(copy, lambda t: t.pop("head.bias"))
    assert_bundle_error(copy, "lacks ['head.bias']")


def test_missing_trunk_tensors(copy: Path) -> None:
    def drop_trunk(tensors: dict[str, torch.Tensor]) -> None:
        for k in [k for k in tensors if k.startswith("trunk.")]:
            del tensors[k]

    edit_weights(copy, drop_trunk)
    assert_bundle_error(copy, "trunk.*")


def test_head_shape_does_not_match_classes(copy: Path) -> None:
    edit_json(copy, classes=["tumor", "stroma"], colors={}, thresholds={})
    assert_bundle_error(copy, "3 outputs", "2 classes", "one class name per head output")


def test_unknown_backbone(copy: Path) -> None:
    edit_json(copy, backbone="uni-l24")
    loaded = load_bundle(copy)  # metadata is readable without the backbone
    assert loaded.describe()["backbone"] == "uni-l24"
    with pytest.raises(BundleError) as info:
        loaded.build_trunk()
    message = str(info.value)
    assert str(copy) in message and "'uni-l24'" in message
    assert "resnet18-l3" in message and "registered" in message


def test_trunk_from_another_architecture(copy: Path) -> None:
    edit_weights(copy, lambda t: t.pop("trunk.layer3.0.conv1.weight"))
    with pytest.raises(BundleError) as info:
        load_bundle(copy).build_trunk()
    message = str(info.value)
    assert str(copy) in message
    assert "does not match backbone 'resnet18-l3'" in message
    assert "missing layer3.0.conv1.weight" in message and "another backbone" in message


def test_trunk_with_wrong_shapes(trunk: nn.Module) -> None:
    state = dict(trunk.state_dict())
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(BundleError, match=r"conv1.weight has shape \(64, 1, 7, 7\)"):
        make_bundle(trunk, trunk_state=state).build_trunk()


def test_a_registered_custom_backbone_is_rebuilt(
    trunk: nn.Module, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def tiny() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2))

    spec = BackboneSpec("tiny-test", 2, 8, 3, (0.5,) * 3, (0.25,) * 3, tiny)
    monkeypatch.setitem(backbones._REGISTRY, "tiny-test", spec)
    gen = torch.Generator().manual_seed(2)
    state = {"0.weight": torch.randn(8, 3, 3, 3, generator=gen), "0.bias": torch.zeros(8)}
    custom = make_bundle(
        trunk, backbone="tiny-test", trunk_state=state, head_weight=torch.ones(3, 8)
    )
    loaded = load_bundle(save_bundle(tmp_path / "tiny.simsearch", custom))
    module, got = loaded.build_trunk()
    assert got is spec
    assert torch.equal(module.state_dict()["0.weight"], state["0.weight"])


# --- constructor validation -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"thresholds": {"tumor": 1.5}}, r"thresholds\['tumor'\] = 1.5 .* \[0, 1\]"),
        ({"thresholds": {"tumor": float("nan")}}, "thresholds"),
        ({"thresholds": {"necrosis": 0.5}}, "not among the bundle's classes"),
        ({"classes": ("tumor", "tumor", "background")}, "unique"),
        ({"classes": ("tumor", "", "background")}, "non-empty"),
        ({"classes": "abc"}, "sequence of names"),
        ({"colors": {"tumor": (256, 0, 0)}}, "3 integers 0-255"),
        ({"colors": {"tumor": (1.5, 0, 0)}}, "3 integers 0-255"),
        ({"colors": {"tumor": (1, 2)}}, "3 integers 0-255"),
        ({"head_bias": torch.zeros(4)}, "one class name per head output"),
        ({"head_weight": torch.full((3, 256), float("nan"))}, "NaN"),
        ({"patch_size_l0": (0.0, 64.0)}, "patch_size_l0 width"),
        ({"patch_size_l0": (96.0,)}, "patch_size_l0"),
        ({"analysis_downsample": -1.0}, "analysis_downsample"),
        ({"context_a": -1}, "context_a"),
        ({"mpp": 0.0}, "mpp"),
        ({"geometry": {"width_a": 48.0}}, "PatchGeometry"),
        ({"normalization": {"method": "x"}}, "ChannelNormalization"),
        ({"metrics": {"loss": float("nan")}}, "JSON"),
        ({"trunk_state": {}}, "trunk_state"),
    ],
)
def test_invalid_arguments_are_refused(
    trunk: nn.Module, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        make_bundle(trunk, **changes)


def test_bundle_error_is_a_value_error() -> None:
    assert issubclass(BundleError, SimSearchError) and issubclass(BundleError, ValueError)
    assert issubclass(BundleNotFoundError, BundleError)
    assert issubclass(BundleNotFoundError, FileNotFoundError)


def _search_head(trunk: nn.Module, **changes: Any) -> ModelBundle:
    """A search-head bundle (memory of 4 window vectors) like those ``--head-input ensemble``
    pairs."""
    gen = torch.Generator().manual_seed(2)
    vectors = torch.nn.functional.normalize(torch.randn(4, 256, generator=gen), dim=1)
    fields: dict[str, Any] = {
        "head_input": "search",
        "feature_norm": "whiten",
        "head_weight": torch.rand(3, 2, generator=gen),
        "head_bias": torch.randn(3, generator=gen),
        "memory_vectors": vectors.to(torch.float16),
        "memory_owner": torch.tensor([0, 1, 2, 3], dtype=torch.int64),
        "provenance": {"search_trunk": "search"},
    }
    fields.update(changes)
    return make_bundle(trunk, **fields)


def test_a_partner_model_round_trips_as_version_3(trunk: nn.Module, tmp_path: Path) -> None:
    """Issue 27, ``--head-input ensemble``: the partner (a search head on the search's trunk)
    is saved in the same file, its tensors under ``partner.``, its metadata nested; the file is
    version 3 (older releases refuse it rather than predict without the partner)."""
    partner = _search_head(trunk)
    tuned = {k: v + 1.0 if v.is_floating_point() else v for k, v in trunk.state_dict().items()}
    pair = _search_head(trunk, trunk_state=tuned, partner=partner)
    path = save_bundle(tmp_path / "pair.zip", pair)
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("bundle.json"))
    assert meta["version"] == 3 and BUNDLE_VERSION == 4
    assert meta["partner"]["head_input"] == "search" and "weights_sha256" not in meta["partner"]
    back = load_bundle(path)
    assert back.partner is not None and back.partner.partner is None
    for mine, theirs in ((back, pair), (back.partner, partner)):
        assert mine.trunk_state.keys() == theirs.trunk_state.keys()
        assert all(torch.equal(mine.trunk_state[k], v) for k, v in theirs.trunk_state.items())
        assert torch.equal(mine.head_weight, theirs.head_weight)
        assert mine.memory_vectors is not None and theirs.memory_vectors is not None
        assert torch.equal(mine.memory_vectors, theirs.memory_vectors)
    assert not torch.equal(
        back.trunk_state["conv1.weight"], back.partner.trunk_state["conv1.weight"]
    )
    assert back.describe()["partner"] == {"head_input": "search", "feature_dim": 256}
    # a partner whose tensors were lost is named in a one-line error
    edit_weights(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("partner.head")])
    with pytest.raises(BundleError, match=r"partner model tensors \['head.weight', 'head.bias'\]"):
        load_bundle(path)


def test_a_partner_model_must_be_one_search_head_of_the_same_classes(trunk: nn.Module) -> None:
    partner = _search_head(trunk)
    with pytest.raises(BundleError, match="same classes and patch size"):
        _search_head(trunk, partner=_search_head(trunk, patch_size_l0=(48.0, 48.0)))
    with pytest.raises(BundleError, match="without a partner of its own"):
        _search_head(trunk, partner=_search_head(trunk, partner=partner))
    with pytest.raises(BundleError, match="without a partner of its own"):
        _search_head(trunk, partner=make_bundle(trunk))  # a linear head is not a partner


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("channels", ("DAPI", "GFP", "RFP"), "channels"),
        ("rgb", False, "rgb"),
        ("mpp", 0.5, "mpp"),
        ("backbone", "resnet18-l2", "backbone"),
    ],
)
def test_a_partner_model_must_score_the_same_windows(
    trunk: nn.Module, field: str, value: Any, named: str
) -> None:
    """A partner that reads other pixels (channels, rgb), another window size (mpp) or another
    feature grid (backbone) would be combined window by window with the wrong windows: refused
    when the bundle is built (and so when it is loaded), with what differs."""
    with pytest.raises(BundleError, match=rf"would score other windows.*{named} ") as info:
        _search_head(trunk, partner=_search_head(trunk, **{field: value}))
    assert "\n" not in str(info.value)


def test_an_older_version_with_a_partner_or_stray_partner_tensors_is_refused(
    trunk: nn.Module, tmp_path: Path
) -> None:
    """Only version 3 holds a partner: a version 2 bundle.json naming one, or a file whose
    partner metadata was removed while weights.pt still holds its tensors, is refused rather
    than read as one model (which would predict without half of it)."""
    pair = _search_head(trunk, partner=_search_head(trunk))
    path = save_bundle(tmp_path / "pair.zip", pair)
    older = Path(shutil.copyfile(path, tmp_path / "older.zip"))
    edit_json(older, version=2)
    assert_bundle_error(older, "version 2", "only version 3")
    edit_json(path, partner=None)
    assert_bundle_error(path, "partner model's tensors", "no 'partner'")


def test_the_digest_names_a_search_heads_memory_and_its_partner(trunk: nn.Module) -> None:
    """The digest keys resumed runs and object ids: a search head with another memory (a second
    review under the same trunk and calibration weights) or another partner is another model;
    a bundle without a memory digests as before (trunk and head weights only)."""
    import hashlib

    from simsearch_wsi.infer.dense import bundle_digest

    plain = make_bundle(trunk)
    h = hashlib.sha256(plain.head_weight.numpy().tobytes())
    h.update(plain.head_bias.numpy().tobytes())
    for name, tensor in sorted(plain.trunk_state.items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    assert bundle_digest(plain) == h.hexdigest()[:16]

    head = _search_head(trunk)
    assert head.memory_vectors is not None and head.memory_owner is not None
    other_memory = dataclasses.replace(head, memory_vectors=-head.memory_vectors)
    other_owner = dataclasses.replace(head, memory_owner=head.memory_owner.flip(0))
    digests = {bundle_digest(b) for b in (head, other_memory, other_owner)}
    assert len(digests) == 3
    pair = _search_head(trunk, partner=head)
    other_pair = _search_head(trunk, partner=other_memory)
    assert bundle_digest(pair) != bundle_digest(other_pair)
    assert bundle_digest(pair) != bundle_digest(_search_head(trunk))  # the partner counts


def _with_expert(head: ModelBundle, **changes: Any) -> ModelBundle:
    """``head`` with a similarity expert on its first and third memory entries."""
    fields: dict[str, Any] = {
        "expert_mask": torch.tensor([True, False, True, False]),
        "expert_weight": torch.tensor([[10.0, 0.0], [10.0, 0.0], [0.0, 0.0]]),
        "expert_bias": torch.tensor([-10.0, -10.0, 0.0]),
        "expert_share": 0.25,
    }
    fields.update(changes)
    return dataclasses.replace(head, **fields)


def test_a_partners_similarity_expert_round_trips_as_version_4(
    trunk: nn.Module, tmp_path: Path
) -> None:
    """The similarity expert (its mask over the partner's memory, its logits' weights and its
    share in the product) is saved with the partner; such a file is version 4, one without
    an expert keeps version 3 and reads back without one; a version 3 file naming an expert is
    refused."""
    plain = _search_head(trunk, partner=_search_head(trunk))
    assert plain.format_version() == 3 and plain.partner is not None
    assert not plain.partner.has_expert and plain.partner.expert_share == 0.0
    pair = _search_head(trunk, partner=_with_expert(_search_head(trunk)))
    path = save_bundle(tmp_path / "pair.zip", pair)
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("bundle.json"))
    assert meta["version"] == 4 and meta["partner"]["expert_share"] == 0.25
    assert "expert_share" not in meta  # the model itself has none
    back = load_bundle(path)
    assert back.partner is not None and back.partner.has_expert and not back.has_expert
    assert back.partner.expert_share == 0.25
    # train's summary says the partner has the expert (and, without one, what it said before)
    assert back.describe()["partner"] == {
        "head_input": "search",
        "feature_dim": 256,
        "similarity_expert": 0.25,
    }
    for name in ("expert_mask", "expert_weight", "expert_bias"):
        assert torch.equal(getattr(back.partner, name), getattr(pair.partner, name)), name
    older = Path(shutil.copyfile(path, tmp_path / "older.zip"))
    edit_json(older, version=3)
    assert_bundle_error(older, "version 3", "only version 4")
    plain_path = save_bundle(tmp_path / "plain.zip", plain)
    with zipfile.ZipFile(plain_path) as zf:
        assert json.loads(zf.read("bundle.json"))["version"] == 3
    assert load_bundle(plain_path).partner.expert_mask is None  # type: ignore[union-attr]


def test_a_similarity_expert_is_all_its_fields_on_a_search_heads_memory(trunk: nn.Module) -> None:
    head = _search_head(trunk)
    with pytest.raises(BundleError, match="together"):
        _with_expert(head, expert_bias=None)
    with pytest.raises(BundleError, match=r"\(M,\) bool tensor"):
        _with_expert(head, expert_mask=torch.tensor([True, False]))
    with pytest.raises(BundleError, match=r"must be \(3, 2\)"):
        _with_expert(head, expert_weight=torch.zeros(3, 3))
    with pytest.raises(BundleError, match="expert_share must be > 0"):
        _with_expert(head, expert_share=0.0)
    with pytest.raises(BundleError, match="no similarity expert"):
        dataclasses.replace(head, expert_share=0.5)
    with pytest.raises(BundleError, match="only a 'search' head"):
        _with_expert(make_bundle(trunk))


def test_the_digest_names_the_similarity_expert(trunk: nn.Module) -> None:
    """A partner with a similarity expert is another model (another digest) than the same
    partner without it, or with another share; without one the digest is as before."""
    from simsearch_wsi.infer.dense import bundle_digest

    head = _search_head(trunk)
    digests = {
        bundle_digest(b) for b in (head, _with_expert(head), _with_expert(head, expert_share=0.5))
    }
    assert len(digests) == 3


def test_only_an_ensembles_partner_has_a_similarity_expert(
    trunk: nn.Module, tmp_path: Path
) -> None:
    """``predict`` reads the similarity expert from an ensemble's partner only, so an expert
    anywhere else (on the model that has the partner, or on a model without one) would be
    silently ignored: refused when built (the model of a pair), when saved and when loaded
    (one line, naming the file); an expert that remembers no memory entry is refused too."""
    with pytest.raises(BundleError, match="the partner's"):
        _with_expert(_search_head(trunk, partner=_search_head(trunk)))
    with pytest.raises(BundleError, match="no memory entry"):
        _with_expert(_search_head(trunk), expert_mask=torch.zeros(4, dtype=torch.bool))
    alone = _with_expert(_search_head(trunk))  # built in memory, as a partner is before pairing
    with pytest.raises(BundleError, match="without a partner") as info:
        save_bundle(tmp_path / "alone.zip", alone)
    assert "alone.zip" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "alone.zip").exists()
    # a file edited so that its partner's expert sits on the model itself
    path = save_bundle(
        tmp_path / "pair.zip", _search_head(trunk, partner=_with_expert(_search_head(trunk)))
    )
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("bundle.json"))
        weights = zf.read("weights.pt")
    tensors = torch.load(io.BytesIO(weights), weights_only=True)
    moved = {
        k.removeprefix("partner."): v for k, v in tensors.items() if k.startswith("partner.expert.")
    }
    for k in list(tensors):
        if k.startswith("partner."):
            del tensors[k]
    tensors.update(moved)
    meta["expert_share"] = meta["partner"].pop("expert_share")
    del meta["partner"]
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    meta["weights_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    edited = tmp_path / "edited.zip"
    with zipfile.ZipFile(edited, "w") as zf:
        zf.writestr("bundle.json", json.dumps(meta))
        zf.writestr("weights.pt", buffer.getvalue())
    assert_bundle_error(edited, "edited.zip", "without a partner")
