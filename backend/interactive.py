"""One interactive request, start to end: session → object tracker → predictor → proposals → RLE.

    request = InteractiveRequest.parse(task, context, label_config, project)
    pipeline = InteractivePipeline(settings, fetcher, model_thread)
    pipeline.answer(request, predictor, exemplars)   # -> {"result", "score", "model_version"}

Data flows one way. The façade (``backend.service``) parses the request and chooses the
predictor (the project's promoted version or the default) and the exemplar store; this module
never calls back into it. Per request it:

1. opens the task's session (the image fetched and encoded once per task, ``backend.sessions``);
2. keeps the exemplar store current with the task's accepted regions;
3. applies the click rule (``backend.click_selection``) with the predictor on that image;
4. with RECALL, adds one proposal per other object like the accepted ones (``backend.proposals``);
5. encodes the regions as Label Studio brush RLE at the image's true size.

The click-independent recall features of an image are computed in a background thread after
its first request, so that the click that triggers recall usually pays only the recall head.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

from model.boxes import Box
from model.clicks import Click
from model.predictor import ClickSegPredictor, ImageState
from model.proposals import propose

from .click_selection import ClickHistory, ObjectTracker, RegionMasks, TrackedObject
from .config import Settings
from .exemplars import Exemplar, ExemplarStore, StoreError, TaskRegions, project_key, regions_from_task
from .images import ImageFetcher
from .model_thread import ModelThread
from .payload import Prompt, bad_request, current_group, parse_context, parse_label_config, task_id, task_image_url
from .proposals import AcceptedRegions, BoxMask, ObjectProposals
from .rle import mask_to_rle
from .sessions import SessionKey, SessionStore, TaskSession

log = logging.getLogger(__name__)

ProposedRegion = Tuple[str, np.ndarray, Box, float]  # (region id, mask inside the box, box, score)


def normalized_project(project: Any) -> Optional[str]:
    """The project id ("1.1795419391", 1, {"id": 1} -> "1"), None when there is no usable one."""
    try:
        return project_key(project)
    except ValueError:
        return None


@dataclass(frozen=True)
class InteractiveRequest:
    """What one ``/predict`` with a ``context`` asks, checked (a 400 names what is wrong)."""

    project: str  # as Label Studio sent it ("" when absent): part of session keys and region ids
    project_key: Optional[str]  # the normalised project id ("1"), None when unknown
    task: int
    task_project_id: Optional[int]  # the task's own integer project (image downloads)
    image_url: str
    image: str  # the Image tag the prompts are on
    brush_control: str  # the BrushLabels control the answer goes to
    label: str
    prompts: Tuple[Prompt, ...]  # the current prompt group (image + label), in creation order
    regions: TaskRegions  # the task's saved brush regions (annotations and drafts)

    @classmethod
    def parse(cls, task: Any, context: Mapping[str, Any], label_config: str, project: str) -> "InteractiveRequest":
        if not isinstance(task, Mapping):
            raise bad_request(f"tasks[0] must be an object, got {type(task).__name__}")
        config = parse_label_config(label_config)
        prompts = current_group(parse_context(context, config))
        newest = prompts[-1]
        brush_control, label = config.brush_output(newest.image, newest.label)
        tid = task_id(task, "tasks[0]")
        url = task_image_url(task, config, newest.image, "tasks[0]")
        key = normalized_project(project or task.get("project"))
        task_project = task.get("project")
        return cls(
            project=project, project_key=key, task=tid,
            task_project_id=task_project if isinstance(task_project, int) else None,
            image_url=url, image=newest.image, brush_control=brush_control, label=label,
            prompts=tuple(prompts), regions=regions_from_task(task, key or "0"),
        )


class ImageModel:
    """The predictor on one encoded image; every call runs on the process's model thread."""

    def __init__(self, predictor: ClickSegPredictor, state: ImageState, model_thread: ModelThread):
        self.predictor, self.state, self._model_thread = predictor, state, model_thread

    def predict(self, clicks: List[Click], prev_prob: Optional[np.ndarray], all_components: bool = False) -> np.ndarray:
        """Probability map float32 (H, W) of ``clicks``, with ``prev_prob`` fed back; ``all_components``
        keeps the parts without a positive click, whatever ``CLICKED_COMPONENTS_ONLY`` says."""
        try:
            return self._model_thread.run(self.predictor.predict, self.state, clicks, prev_mask=prev_prob,
                                          clicked_components_only=False if all_components else None)
        except ValueError as exc:
            raise bad_request(f"the model rejected the clicks: {exc}") from None

    def propose(self, exemplar: np.ndarray, obj: TrackedObject, exclude: np.ndarray, settings: Settings) -> List:
        """The recall head's proposals for ``obj`` like ``exemplar`` (bool (H, W) each)."""
        return self._model_thread.run(
            propose, self.predictor, self.state, exemplar, obj.clicks, obj.prob, exclude=exclude,
            min_score=settings.recall_min_score, min_area=settings.recall_min_area,
            max_proposals=settings.recall_max_proposals)


def fits(region: Any, current_id: str, height: int, width: int) -> bool:
    """Whether an ``Exemplar`` is another object's region of the image's size."""
    return region.region_id != current_id and (region.height, region.width) == (height, width)


class InteractivePipeline:
    """Answers interactive requests; holds the task sessions and the recall warm-up thread."""

    def __init__(self, settings: Settings, fetcher: ImageFetcher, model_thread: ModelThread):
        self.settings = settings
        self.fetcher = fetcher
        self._model_thread = model_thread
        self.sessions = SessionStore(settings.session_cache_bytes)
        self._recall_warmer: Optional[ThreadPoolExecutor] = None  # one background thread per process
        self._recall_warmer_pid: Optional[int] = None
        self._recall_warming: Set[SessionKey] = set()  # session keys queued for warm-up
        self._recall_warmer_lock = threading.Lock()

    def answer(self, request: InteractiveRequest, predictor: ClickSegPredictor,
               exemplars: Optional[ExemplarStore]) -> Dict[str, Any]:
        """``{"result": [brush regions], "score", "model_version"}``: the object first, then its proposals."""
        started = time.perf_counter()
        version = predictor.model_version
        recall_on = self.settings.recall and bool(getattr(predictor, "has_recall", False))
        regions = request.regions.on_image(request.image, request.label)
        # With recall, accepted regions of every label on the image are kept out of proposals.
        accepted_regions = request.regions.on_image(request.image) if recall_on else regions

        # Sessions hold the model's image features: one model version never reads another's.
        key = (request.project, request.task, request.image_url, version)
        session = self.sessions.get_or_create(key, lambda: self._open_session(predictor, request))
        if request.project_key is not None and exemplars is not None:
            sync_exemplars(exemplars, request.regions, session.image_state)
        with session.lock:
            state = session.image_state
            group = (request.image, request.label)
            history = session.histories.setdefault(group, ClickHistory())
            if session.last_group not in (None, group):  # a label switch finishes the other label's object
                finished = session.histories.get(session.last_group)
                if finished is not None:
                    finished.finished = True
            session.last_group = group
            image_model = ImageModel(predictor, state, self._model_thread)
            tracker = ObjectTracker(state.height, state.width, image_model, namespace=(request.project, request.task))
            saved = RegionMasks(regions, (state.height, state.width), history.region_masks)
            try:
                obj = tracker.segment(history, request.prompts, saved)
            except BaseException:
                session.histories.pop(group, None)  # never keep a half-applied history
                raise
            decoded = RegionMasks(accepted_regions, (state.height, state.width), history.region_masks)  # shares saved's masks
            proposals: List[ProposedRegion] = []
            recall_ms = 0.0
            if recall_on:
                recall_started = time.perf_counter()
                try:
                    proposals = self._proposals(image_model, history, obj, decoded, request, exemplars)
                except Exception as exc:  # recall is a bonus: never fail the object's answer
                    history.proposals = None
                    log.warning("exemplar recall failed; answering the object's region only",
                                extra={"task": request.task, "reason": f"{type(exc).__name__}: {exc}"})
                recall_ms = (time.perf_counter() - recall_started) * 1000
            else:
                history.proposals = None
            decoded.prune()
            mask = obj.mask
            score = float(obj.prob[mask].mean()) if mask.any() else 0.0
            shape = (state.height, state.width)
            self.sessions.remeasure(key)  # under the session lock: no request changes it meanwhile
        if recall_on and state.recall_features is None:
            self._warm_recall(predictor, key, session)

        result = [brush_region(request, obj.result_id, mask, score, shape)]
        result += [brush_region(request, region_id, crop, proposal_score, shape, box)
                   for region_id, crop, box, proposal_score in proposals]
        log.info("interactive prediction", extra={
            "task": request.task, "prompts": len(request.prompts), "object_clicks": len(obj.clicks),
            "object_start": obj.start, "object_id": obj.result_id, "saved_regions": [r.region_id for r in regions],
            "model_calls": tracker.predictions, "mask_pixels": int(mask.sum()),
            "proposals": len(proposals), "recall_ms": round(recall_ms, 1),
            "ms": round((time.perf_counter() - started) * 1000, 1),
        })
        return {"result": result, "score": score, "model_version": version}

    # --- session ---------------------------------------------------------------------------------

    def _open_session(self, predictor: ClickSegPredictor, request: InteractiveRequest) -> TaskSession:
        started = time.perf_counter()
        # The model works on at most max_working_side pixels: a large JPEG is decoded reduced to that.
        image = self.fetcher.fetch_decoded(request.image_url, task_id=request.task, project_id=request.task_project_id,
                                           min_side=predictor.max_working_side)
        state = self._model_thread.run(predictor.encode_image, image.pixels, (image.height, image.width))
        log.info("image fetched and encoded", extra={"task": request.task, "width": state.width, "height": state.height,
                                                     "ms": round((time.perf_counter() - started) * 1000, 1)})
        return TaskSession(image_state=state)

    # --- exemplar recall ---------------------------------------------------------------------------

    def _proposals(self, image_model: ImageModel, history: ClickHistory, obj: TrackedObject, decoded: RegionMasks,
                   request: InteractiveRequest, exemplars: Optional[ExemplarStore]) -> List[ProposedRegion]:
        """The current object's proposals (call under the session lock).

        Computed on the object's first click when the task has accepted regions of the label,
        then kept in ``history`` and returned again while the object is refined.
        """
        cached = history.proposals
        if cached is not None and not cached.belongs_to(obj.result_id, obj.start):
            cached = history.proposals = None  # an earlier object's
        first_click = len(obj.clicks) == 1 and obj.clicks[0].is_positive
        if cached is None and not first_click:
            return []
        state = image_model.state
        accepted = accepted_regions(decoded, exemplars, request, state.height, state.width, current_id=obj.result_id)
        if first_click and (cached is None or cached.exemplar_ids != accepted.exemplar_ids):
            history.proposals = None
            if not accepted.exemplar_ids:
                return []
            found = image_model.propose(accepted.exemplar, obj, accepted.covered, self.settings)
            cached = history.proposals = ObjectProposals.of(obj.result_id, obj.start, accepted.exemplar_ids, found)
        return cached.visible(accepted, obj.mask, self.settings.recall_min_area)

    def _warm_recall(self, predictor: ClickSegPredictor, key: SessionKey, session: TaskSession) -> None:
        """Queue the image's recall features for the background thread (once per session at a time)."""
        with self._recall_warmer_lock:
            if key in self._recall_warming:
                return
            if self._recall_warmer is None or self._recall_warmer_pid != os.getpid():  # none yet, or forked
                self._recall_warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recall-warmup")
                self._recall_warmer_pid = os.getpid()
                self._recall_warming = set()
            self._recall_warming.add(key)
            self._recall_warmer.submit(self._encode_recall, predictor, key, session)

    def _encode_recall(self, predictor: ClickSegPredictor, key: SessionKey, session: TaskSession) -> None:
        started = time.perf_counter()
        try:
            if key not in self.sessions.cache:
                return  # evicted meanwhile
            if session.image_state.recall_features is not None:
                return
            self._model_thread.run(predictor.encode_recall, session.image_state)  # a no-op once computed
            with session.lock:
                self.sessions.remeasure(key)
            log.debug("recall features computed in the background", extra={
                "task": key[1], "ms": round((time.perf_counter() - started) * 1000, 1)})
        except Exception as exc:
            log.warning("recall warm-up failed", extra={"task": key[1], "reason": f"{type(exc).__name__}: {exc}"})
        finally:
            with self._recall_warmer_lock:
                self._recall_warming.discard(key)


def accepted_regions(decoded: RegionMasks, exemplars: Optional[ExemplarStore], request: InteractiveRequest,
                     height: int, width: int, current_id: str) -> AcceptedRegions:
    """The task's accepted regions on the request's image: the payload's, plus the store's that it lacks.

    The region of the object being refined (``current_id``, e.g. auto-accepted) is not
    accepted; regions of another size or with a corrupt RLE are skipped.
    """
    accepted = AcceptedRegions(height, width)
    for index, region in enumerate(decoded.regions):
        mask = decoded.mask(index) if fits(region, current_id, height, width) else None
        if mask is not None:
            accepted.add(region.region_id, mask, request.label in region.labels)
    if exemplars is None or request.project_key is None:
        return accepted
    try:
        stored: List[Exemplar] = exemplars.accepted_masks(request.project_key, request.task)
    except (ValueError, StoreError) as exc:
        log.warning("exemplar store unreadable; recall uses the payload's regions",
                    extra={"task": request.task, "reason": str(exc)})
        return accepted
    for exemplar in stored:
        if (exemplar.region_id in accepted.ids or exemplar.to_name not in ("", request.image)
                or not fits(exemplar, current_id, height, width)):
            continue
        try:
            mask = exemplar.mask
        except ValueError as exc:
            log.warning("ignoring a stored region with a corrupt RLE",
                        extra={"task": request.task, "region_id": exemplar.region_id, "reason": str(exc)})
            continue
        accepted.add(exemplar.region_id, BoxMask.of(mask), request.label in exemplar.labels)
    return accepted


def sync_exemplars(exemplars: ExemplarStore, task_regions: TaskRegions, state: ImageState) -> None:
    """Store the task's accepted brush masks (annotations, drafts); never fails the request."""
    try:
        exemplars.sync_task(task_regions, image_size=(state.height, state.width))
    except (ValueError, StoreError) as exc:
        log.warning("exemplar sync skipped", extra={"task": task_regions.task_id, "reason": str(exc)})


def brush_region(request: InteractiveRequest, region_id: str, mask: np.ndarray, score: float,
                 shape: Tuple[int, int], box: Optional[Box] = None) -> Dict[str, Any]:
    """A Label Studio brush region of ``mask``: the whole image's (H, W), or the part inside ``box``."""
    height, width = shape
    rle = mask_to_rle(mask, box=box, shape=None if box is None else shape)
    return {
        "id": region_id,
        "from_name": request.brush_control,
        "to_name": request.image,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [request.label]},
        "score": score,
    }
