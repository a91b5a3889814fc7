"""The local HTTP server QuPath scripts talk to: warm model and feature caches, JSON in and out.

QuPath runs Groovy scripts and bundles an HTTP client but no server, so the interactive loop is a
Python server (bound to 127.0.0.1 by default) that keeps the trunk and the feature caches warm.
Scripts send the image's URI (``getCurrentServer().getURIs()``) and annotations as GeoJSON, and
add the GeoJSON features that come back. Pixels never travel over HTTP: the server reads the
image from disk, so every path must lie inside one of the folders the server was started with.

Protocol (version :data:`PROTOCOL_VERSION`, everything under ``/api/v1``; OpenAPI at
``/api/v1/openapi.json``, docs at ``/api/v1/docs``):

============================  ==================================================================
``GET  /health``              status, protocol, package version, backbone, weights, device
``POST /suggest``             ``{image, annotations?, session?, thresholds?, background?}`` ->
                              a FeatureCollection of suggestions with a ``summary`` member
``POST /review``              ``{image, annotations, session}`` -> the review report
``POST /background``          ``{image, session, n?}`` -> a FeatureCollection of candidates
``GET  /session?dir=DIR``     the session's summary
``POST /jobs/embed``          ``{images, patch_size_px?}`` -> 202 ``{job_id}``
``POST /jobs/train``          ``{session, out?, strategy?, preset?, noisy_images?, seed?}`` ->
                              202 ``{job_id}``; the result names the model bundle written
``POST /jobs/predict``        ``{images, model, out, thresholds?, simplify_px?, min_area_um2?,
                              write_back?, force?}`` -> 202 ``{job_id}``; the result names the
                              files written per image and ``quantification.csv``
``POST /jobs/quantify``       ``{image, annotations?, mpp?, thresholds?, three_classes?,
                              compartment?, detection_image?, cell_expansion_um?, stains?,
                              out?}`` -> 202 ``{job_id}``; the result holds the IHC scores per
                              region and the cells and scored annotations as QuPath GeoJSON
``GET  /jobs``                ``{"jobs": [job, ...]}``
``GET  /jobs/{id}``           ``{id, kind, state, progress, error, result, ...}``
``DELETE /jobs/{id}``         cancel a queued or running job
============================  ==================================================================

Rules every route follows:

* an image is a local path or a ``file:`` URI (percent-encoded, as QuPath writes them); it and
  every other path must resolve (symlinks followed) inside one of the allowed roots (403),
  including the paths the server reads from files: the images a session file names are checked
  before anything is opened, and images are opened only through the same rule
  (:class:`.paths.AllowedPaths`);
* no output may replace or land inside an input (the session file, the model, an OME-Zarr
  image), whatever the spelling (400, :mod:`simsearch_wsi.core.pathguard`);
* with a token, every route but ``/health`` needs ``Authorization: Bearer <token>`` (401);
  without one, the ``Host`` header must name a loopback address (403; this stops DNS rebinding
  from web pages);
* a client may send ``X-SimSearch-Protocol: 1``; another value is answered 409;
* request bodies are JSON (415 otherwise) of at most ``max_body_bytes`` (413);
* every error is ``{"error": {"type": ..., "message": <one line>}}``.

Concurrency: one lock guards the engine (the trunk and the feature cache), so requests and jobs
that need it run one at a time (a train job holds it for the whole training); a predict job
does not take it (it runs its own model, not the engine's trunk or caches, on the engine's
device); one lock per session folder serialises updates to a session (a train job reads its
session under it, then trains on that snapshot).
Long work runs as jobs in a thread pool owned by the app; a job reports progress through
:class:`.jobs.JobContext`, and cancelling makes the next progress report raise inside the job.

Modules:

==========================  ==================================================================
:mod:`.app`                 :func:`create_app` (wires the parts below) and :func:`serve`
:mod:`.protocol`            protocol version, route prefix, protocol header
:mod:`.routes`              the routes, one module per resource (review loop, jobs, ...)
:mod:`.schemas`             request and response bodies
:mod:`.jobs`                the background job registry and runner
:mod:`.gate`                the middleware checking host, protocol, token and body
:mod:`.security`            loopback hosts and bearer tokens
:mod:`.paths`               client paths resolved inside the allowed roots
:mod:`.locks`               the engine lock and the per-session locks
:mod:`.context`             what the routes of one app share
:mod:`.errors`              errors as HTTP answers
==========================  ==================================================================
"""

from simsearch_wsi.io.uri import local_path
from simsearch_wsi.server.app import create_app, serve
from simsearch_wsi.server.jobs import Job, JobContext, JobManager
from simsearch_wsi.server.protocol import API_PREFIX, PROTOCOL_HEADER, PROTOCOL_VERSION
from simsearch_wsi.server.security import is_loopback

__all__ = [
    "API_PREFIX",
    "PROTOCOL_HEADER",
    "PROTOCOL_VERSION",
    "Job",
    "JobContext",
    "JobManager",
    "create_app",
    "is_loopback",
    "local_path",
    "serve",
]
