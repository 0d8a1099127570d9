"""Domain errors. Each class carries its HTTP status and code; `app` renders the one JSON shape."""

from __future__ import annotations


class BatchServeError(Exception):
    """Every error answer's base; itself, a bug outside the engine or an image that could not
    be encoded: logged with its traceback, answered without it."""

    status: int = 500
    code: str = "internal_error"
    reject_reason: str | None = None

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class MalformedJSON(BatchServeError):
    """The body is not strict JSON: `NaN`, `Infinity`, numbers that overflow a double,
    invalid UTF-8, lone surrogates, text after the object, nesting over 1024 levels."""

    status, code, reject_reason = 400, "malformed_json", "invalid"


class MalformedForm(BatchServeError):
    status, code, reject_reason = 400, "malformed_body", "invalid"


class Unauthorized(BatchServeError):
    """`--api-key` is set and the `Authorization: Bearer` key is missing or wrong (with
    `WWW-Authenticate: Bearer`)."""

    status, code = 401, "unauthorized"


class NotFound(BatchServeError):
    """No such route; for jobs, an unknown, malformed or expired job id."""

    status, code = 404, "not_found"


class MethodNotAllowed(BatchServeError):
    """The route exists but not for this method (with `Allow`)."""

    status, code = 405, "method_not_allowed"


class JobNotFinished(BatchServeError):
    """`GET /v1/jobs/{id}/image` of a job that is queued, running, failed or canceled."""

    status, code = 409, "job_not_succeeded"


class Gone(BatchServeError):
    """`GET /v1/jobs/{id}/image` after `DELETE` removed the image."""

    status, code = 410, "gone"


class BodyTooLarge(BatchServeError):
    """The body is over `--max-body-bytes`, by `Content-Length` or while streaming a chunked
    body."""

    status, code, reject_reason = 413, "body_too_large", "invalid"


class UnsupportedMediaType(BatchServeError):
    """`Content-Type` is not `application/json` (or a `+json` type)."""

    status, code, reject_reason = 415, "unsupported_media_type", "invalid"


class ValidationError(BatchServeError):
    """A field is missing, unknown, of the wrong type or out of range; `field` names it."""

    status, code, reject_reason = 422, "validation_error", "invalid"


class TenantQueueFull(BatchServeError):
    """This API key's tenant already has its `max_queued` requests and jobs waiting (with
    `Retry-After`); other tenants are still admitted."""

    status, code, reject_reason = 429, "tenant_queue_full", "queue_full"


class RateLimited(BatchServeError):
    """This API key's tenant is over its `images_per_minute` (with `Retry-After`: when the
    images asked for would be within the rate again)."""

    status, code, reject_reason = 429, "rate_limited", "rate_limited"


class QueueFull(BatchServeError):
    """`--max-queue` requests are already waiting (with `Retry-After`, from the queue depth
    and recent batch times)."""

    status, code, reject_reason = 429, "queue_full", "queue_full"


class JobsQueueFull(BatchServeError):
    """`--max-jobs-waiting` jobs are already accepted and not yet taken by a worker (with
    `Retry-After`); nothing was stored."""

    status, code, reject_reason = 429, "jobs_queue_full", "queue_full"


class GenerationFailed(BatchServeError):
    """The engine failed this request (a failing batch is bisected so only the request that
    causes the error fails); the message says so, the details are in the server log."""

    status, code, reject_reason = 500, "generation_failed", "failed"


class NotReady(BatchServeError):
    """The model is still loading, or the server has failed (with `Retry-After`)."""

    status, code = 503, "not_ready"


class Draining(BatchServeError):
    """SIGTERM received: not admitting, or the drain grace period ended before the request
    ran (with `Retry-After`)."""

    status, code = 503, "draining"


class BackendDown(BatchServeError):
    """The job queue or result store cannot be reached; nothing was stored."""

    status, code = 503, "backend_unavailable"


class NotServedHere(BatchServeError):
    """This process's `--role` does not serve the route (e.g. /t2i on `--role api`)."""

    status, code = 503, "not_served_here"


class QueueTimeout(BatchServeError):
    """Not finished within its `timeout_s` (queue plus generation): answered at that moment,
    queued or mid-batch."""

    status, code, reject_reason = 504, "timeout", "timeout"


class Overloaded(BatchServeError):
    """Refused at admission: the work ahead would make it finish past its budget. Waiting
    helps, so it carries `Retry-After`."""

    status, code, reject_reason = 503, "overloaded", "overloaded"


class CannotFinish(BatchServeError):
    """Refused at admission (or before its batch): even alone on an idle engine it would finish
    past its `timeout_s`. Retrying does not help; a longer `timeout_s` does."""

    status, code, reject_reason = 504, "deadline_unreachable", "deadline"


class Interrupted(Exception):
    """Raised by an engine between denoising steps when its `should_stop` said so: nobody is
    waiting for any image of the batch any more."""


class EngineOutOfMemory(Exception):
    """Raised by an engine when a batch does not fit in device memory; the batcher splits it."""


class EngineHung(BatchServeError):
    """A batch ran far past its predicted time (the watchdog); the process restarts."""

    status, code, reject_reason = 503, "engine_hung", "failed"
