"""Request and response bodies of the protocol (pydantic models; the OpenAPI schema comes from
them). Request bodies forbid unknown fields and non-finite numbers."""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from simsearch_wsi.search.choices import (
    CANDIDATES_HELP,
    DENSE_HELP,
    HEATMAP_DOWNSAMPLE_HELP,
    SIMILARITY_MAX,
    SIMILARITY_MIN,
)
from simsearch_wsi.server.jobs import JobState
from simsearch_wsi.train.choices import (
    DEFAULT_HEAD_INPUT,
    DEFAULT_SIMILARITY_EXPERT,
    DEFAULT_STRATEGY,
    HEAD_INPUT_HELP,
    HEAD_INPUTS,
    PRESETS,
    SIMILARITY_EXPERT_HELP,
    STRATEGIES,
)

__all__ = [
    "ERROR_RESPONSES",
    "BackgroundRequest",
    "EmbedJobRequest",
    "ErrorDetail",
    "ErrorResponse",
    "FeatureCollectionResponse",
    "FolderPath",
    "GeoJSON",
    "HealthResponse",
    "ImagePath",
    "JobCreated",
    "JobInfo",
    "JobList",
    "JobProgress",
    "PredictJobRequest",
    "QuantifyJobRequest",
    "ReviewRequest",
    "SuggestRequest",
    "TrainJobRequest",
]


# --- requests ------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


ImagePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="absolute local path, or file: URI as QuPath's getCurrentServer().getURIs()",
    ),
]
FolderPath = Annotated[str, Field(min_length=1, max_length=4096)]
GeoJSON = dict[str, Any] | list[Any]


def _geojson_value(value: Any) -> Any:
    if value is not None and not isinstance(value, dict | list):
        raise ValueError(
            "must be GeoJSON: a FeatureCollection object, a Feature or an array of Features "
            f"(got a JSON {type(value).__name__})"
        )
    return value


#: the search rule of a request (``suggest --dense`` / ``--no-dense``)
_DENSE_FIELD = (
    DENSE_HELP + ". true: the object rule, false: the patch rule; null: the session's rule, else "
    "the server's (serve --dense/--no-dense, default the object rule)"
)

#: where suggestions come from (``suggest --candidates``)
_CANDIDATES_FIELD = (
    CANDIDATES_HELP + "; null: the session's, else the server's (serve --candidates, default auto)"
)
#: the values of ``candidates`` (``simsearch_wsi.search.choices.CANDIDATE_RULES``)
Candidates = Literal["grid", "objects", "auto"]


class SuggestRequest(_Body):
    image: ImagePath
    annotations: GeoJSON | None = Field(
        None,
        description="QuPath GeoJSON (FeatureCollection) whose classified rectangles are "
        "prototypes; null: the session's saved prototypes",
    )
    session: FolderPath | None = Field(
        None, description="review session folder (created if missing)"
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="class -> minimum similarity (default 0.5)"
    )
    background: int = Field(
        0, ge=0, le=10_000, description="also return N most and N least similar unlabelled patches"
    )
    floor: float | None = Field(
        None,
        ge=SIMILARITY_MIN,
        le=SIMILARITY_MAX,
        description="also return the candidates down to this similarity (below the thresholds), "
        "ranked, so a viewer can move each class's threshold without asking again; null: none",
    )
    heatmap: bool = Field(
        False,
        description="also return the per-class similarity heat maps ('heatmap': level-0 aligned "
        "PNG images, see simsearch_wsi.search.heatmap)",
    )
    heatmap_downsample: float | None = Field(
        None, gt=0, description=HEATMAP_DOWNSAMPLE_HELP + "; null: the default"
    )
    dense: bool | None = Field(None, description=_DENSE_FIELD)
    candidates: Candidates | None = Field(None, description=_CANDIDATES_FIELD)

    _annotations = field_validator("annotations", mode="before")(_geojson_value)


class ReviewRequest(_Body):
    image: ImagePath
    annotations: GeoJSON = Field(description="the objects exported from QuPath after review")
    session: FolderPath
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="class -> similarity threshold the user ended at (saved in the session; "
        "decides which suggestions kept in place are approved); classes left out keep theirs",
    )

    _annotations = field_validator("annotations", mode="before")(_geojson_value)


class BackgroundRequest(_Body):
    image: ImagePath
    session: FolderPath
    n: int = Field(10, ge=1, le=10_000, description="candidates of each kind")
    dense: bool | None = Field(None, description=_DENSE_FIELD)
    candidates: Candidates | None = Field(None, description=_CANDIDATES_FIELD)


class _PlateSelection(_Body):
    wells: list[str] | None = Field(
        None,
        max_length=10_000,
        description="OME-Zarr plates among the images: only these wells (e.g. ['A1', 'B12']); "
        "null: every well. One field can also be given as an image by its path, PLATE/A/1/0",
    )
    fields: list[int] | None = Field(
        None,
        max_length=10_000,
        description="OME-Zarr plates among the images: only these fields of each well "
        "(0 = the first); null: every field",
    )


def plate_selection(body: _PlateSelection) -> dict[str, Any]:
    """The ``wells`` and ``fields`` of a request as :func:`simsearch_wsi.io.selection.expand_images`
    takes them (checked: well names, field indices from 0)."""
    from simsearch_wsi.io.selection import parse_fields, parse_wells

    wells = ",".join(body.wells) if body.wells else None
    fields = ",".join(str(f) for f in body.fields) if body.fields else None
    return {
        "wells": parse_wells(wells, option="wells"),
        "fields": parse_fields(fields, option="fields"),
    }


class EmbedJobRequest(_PlateSelection):
    images: list[ImagePath] = Field(
        min_length=1,
        max_length=10_000,
        description="images, OME-Zarr images, plates (every field, or wells/fields) or plate "
        "fields (PLATE/A/1/0)",
    )
    patch_size_px: float = Field(
        64.0, gt=0, le=1_000_000, description="expected prototype size in level-0 pixels"
    )


def _one_of(allowed: Sequence[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
        return value

    return check


class TrainJobRequest(_PlateSelection):
    session: FolderPath = Field(description="the review session folder to train from")
    out: FolderPath | None = Field(
        None,
        description="where to write the model bundle (a .zip file); default <session>/model.zip",
    )
    strategy: str = Field(
        DEFAULT_STRATEGY,
        description="training stages: positives, negatives (rejected suggestions), "
        "self-learning on noisy patches",
        json_schema_extra={"enum": list(STRATEGIES)},
    )
    preset: str = Field(
        "fast",
        description="fast: minutes on a CPU; paper: the SimSearch paper's schedules",
        json_schema_extra={"enum": list(PRESETS)},
    )
    noisy_images: list[ImagePath] = Field(
        default_factory=list,
        max_length=10_000,
        description="unreviewed images to mine noisy patches from; default: the session's "
        "unreviewed images",
    )
    head_input: str = Field(
        DEFAULT_HEAD_INPUT,
        description=HEAD_INPUT_HELP,
        json_schema_extra={"enum": list(HEAD_INPUTS)},
    )
    similarity_expert: float = Field(
        DEFAULT_SIMILARITY_EXPERT, ge=0, le=1000, description=SIMILARITY_EXPERT_HELP
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, strict=True)

    _strategy = field_validator("strategy")(_one_of(STRATEGIES, "strategy"))
    _preset = field_validator("preset")(_one_of(PRESETS, "preset"))
    _head_input = field_validator("head_input")(_one_of(HEAD_INPUTS, "head input"))


class PredictJobRequest(_PlateSelection):
    images: list[ImagePath] = Field(
        min_length=1,
        max_length=10_000,
        description="slides, images, OME-Zarr images, plates (every field, or wells/fields) or "
        "plate fields (PLATE/A/1/0)",
    )
    model: FolderPath = Field(description="the model bundle (.zip) to apply, as a train job writes")
    out: FolderPath = Field(description="output folder (created if missing)")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="class -> confidence threshold in [0, 1]; classes left out keep the model's",
    )
    simplify_px: float = Field(
        1.0, ge=0, le=10_000, description="polygon simplification tolerance in mask pixels"
    )
    min_area_um2: float = Field(
        0.0,
        ge=0,
        le=1e12,
        description="drop segmentation pieces (and fill holes) under this area in um2",
    )
    write_back: bool = Field(
        False, description="also add the label mask to OME-Zarr inputs as labels/simsearch"
    )
    force: bool = Field(
        False, description="redo images whose outputs exist for the same model and settings"
    )

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        for name, p in value.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p}: give a probability in [0, 1]")
        return value


class QuantifyJobRequest(_Body):
    image: ImagePath
    annotations: GeoJSON | None = Field(
        None,
        description="QuPath GeoJSON whose annotations (and TMA cores) are the regions to score; "
        "null or none: the whole image",
    )
    mpp: float | None = Field(
        None, gt=0, le=1e6, description="level-0 um/px when the file has none (PNG, JPEG)"
    )
    thresholds: list[float] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6],
        min_length=3,
        max_length=3,
        description="1+/2+/3+ thresholds on the compartment (QuPath's defaults)",
    )
    three_classes: bool = Field(
        False, description="classify cells 1+/2+/3+/Negative instead of Positive/Negative"
    )
    compartment: str = Field(
        "Nucleus: DAB OD mean",
        min_length=1,
        max_length=200,
        description="the cell measurement compared with the thresholds",
    )
    detection_image: str = Field(
        "hematoxylin",
        description="image nuclei are found on",
        json_schema_extra={"enum": ["hematoxylin", "od_sum"]},
    )
    cell_expansion_um: float = Field(5.0, ge=0, le=100, description="cell = nucleus grown by this")
    stains: str = Field(
        "default",
        description="hematoxylin/DAB vectors: QuPath's H-DAB default, or estimated on the image",
        json_schema_extra={"enum": ["default", "estimate"]},
    )
    out: FolderPath | None = Field(
        None,
        description="also write <stem>.ihc.geojson, <stem>.cells.csv and ihc_scores.csv here",
    )

    _annotations = field_validator("annotations", mode="before")(_geojson_value)
    _detection_image = field_validator("detection_image")(
        _one_of(("hematoxylin", "od_sum"), "detection image")
    )
    _stains = field_validator("stains")(_one_of(("default", "estimate"), "stains"))


# --- responses -----------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: str
    protocol: int
    version: str
    backbone: str
    weights: str
    device: str
    auth_required: bool


class FeatureCollectionResponse(BaseModel):
    type: Literal["FeatureCollection"]
    features: list[dict[str, Any]]
    summary: dict[str, Any] = Field(default_factory=dict)


class JobCreated(BaseModel):
    job_id: str


class JobProgress(BaseModel):
    stage: str
    done: int
    total: int


class JobInfo(BaseModel):
    id: str
    kind: str
    state: JobState
    progress: JobProgress
    error: str | None
    result: Any
    params: dict[str, Any]
    cancel_requested: bool
    created: str | None
    started: str | None
    finished: str | None


class JobList(BaseModel):
    jobs: list[JobInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


#: The error answers every route may give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422)
}
