"""Why a request fails, as exceptions naming the gRPC status code they answer with (grpc-free):
the job queue and the generator raise them, the servicer (service.py) turns them into statuses.
`field` names the request field at fault (a google.rpc.BadRequest field violation), `retry_after_s`
says when a retry may succeed (google.rpc.RetryInfo): the status details clients read."""


class RpcFailure(Exception):
    code_name = "INTERNAL"

    def __init__(self, message: str, *, field: str = "", retry_after_s: float | None = None):
        super().__init__(message)
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidArgument(RpcFailure):
    code_name = "INVALID_ARGUMENT"


class ResourceExhausted(RpcFailure):
    code_name = "RESOURCE_EXHAUSTED"


class NotFoundError(RpcFailure):
    code_name = "NOT_FOUND"


class DeadlineExceeded(RpcFailure):
    code_name = "DEADLINE_EXCEEDED"


class Unavailable(RpcFailure):
    code_name = "UNAVAILABLE"


class AlreadyExists(RpcFailure):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(RpcFailure):
    code_name = "FAILED_PRECONDITION"


class DataLoss(RpcFailure):
    code_name = "DATA_LOSS"


class Cancelled(RpcFailure):
    code_name = "CANCELLED"
