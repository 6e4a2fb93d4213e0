"""Clients no one here wrote: Python stubs generated from proto/ with
grpcio-tools call every Plinth service over gRPC. Exits non-zero on the first
mismatch. Usage: grpc_clients.py PROTO_DIR OUT_DIR HOST:PORT EMAIL PASSWORD"""

import glob
import os
import sys
import uuid

from grpc_tools import protoc

proto_dir, out_dir, target, email, password = sys.argv[1:6]

# Generate the stubs exactly as a user of the contracts would.
os.makedirs(out_dir, exist_ok=True)
files = sorted(
    os.path.relpath(p, proto_dir)
    for p in glob.glob(os.path.join(proto_dir, "**", "*.proto"), recursive=True)
)
well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
code = protoc.main(
    ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    + files
)
assert code == 0, f"protoc failed with {code}"
sys.path.insert(0, out_dir)

import grpc  # noqa: E402

from plinth.ai.v1 import ai_pb2, ai_pb2_grpc  # noqa: E402
from plinth.audit.v1 import audit_pb2, audit_pb2_grpc  # noqa: E402
from plinth.auth.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from plinth.config.v1 import config_pb2, config_pb2_grpc  # noqa: E402
from plinth.queue.v1 import queue_pb2, queue_pb2_grpc  # noqa: E402


def refused(code, call, what):
    """Runs `call`, which must fail with `code`; returns the error."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() == code, e
        return e
    raise AssertionError(f"{what} was answered")


channel = grpc.insecure_channel(target)
grpc.channel_ready_future(channel).result(timeout=10)

# auth: log in, then who am I.
auth = auth_pb2_grpc.AuthServiceStub(channel)
login = auth.Login(auth_pb2.LoginRequest(email=email, password=password))
token = login.tokens.access_token
assert token and login.tokens.token_type.lower() == "bearer", login.tokens
md = [("authorization", f"Bearer {token}")]
me = auth.GetMe(auth_pb2.GetMeRequest(), metadata=md)
assert me.user.email == email, me
refused(grpc.StatusCode.UNAUTHENTICATED, lambda: auth.GetMe(auth_pb2.GetMeRequest()), "GetMe without a token")

# config: a namespace, an environment, a value written and read back.
config = config_pb2_grpc.ConfigServiceStub(channel)
ns = "py" + uuid.uuid4().hex[:8]
config.CreateNamespace(config_pb2.CreateNamespaceRequest(namespace=config_pb2.Namespace(name=ns)), metadata=md)
config.CreateEnvironment(
    config_pb2.CreateEnvironmentRequest(namespace=ns, environment=config_pb2.Environment(name="prod")), metadata=md
)
config.SetValue(
    config_pb2.SetValueRequest(
        namespace=ns, environment="prod", key="db/pool", value=config_pb2.Value(number_value=16)
    ),
    metadata=md,
)
got = config.GetValue(config_pb2.GetValueRequest(namespace=ns, environment="prod", key="db/pool"), metadata=md)
assert got.value.value.number_value == 16, got
refused(
    grpc.StatusCode.INVALID_ARGUMENT,
    lambda: config.GetValue(config_pb2.GetValueRequest(namespace=ns, environment="prod", key="Not A Key!"), metadata=md),
    "an invalid key",
)

# config Watch, a server stream: the snapshot, then a live change, then a
# refusal for an environment that does not exist.
def changes(stream):
    """The next message that carries changes (progress messages skipped)."""
    for m in stream:
        if m.events:
            return m
    raise AssertionError("the watch ended")


def pairs(m):
    return [(e.value.key, e.value.value.number_value) for e in m.events]


watch = config.Watch(config_pb2.WatchRequest(namespace=ns, environment="prod"), metadata=md, timeout=30)
snapshot = changes(watch)
assert snapshot.snapshot and snapshot.snapshot_complete and pairs(snapshot) == [("db/pool", 16)], snapshot
config.SetValue(
    config_pb2.SetValueRequest(
        namespace=ns, environment="prod", key="db/timeout", value=config_pb2.Value(number_value=5), message="from python"
    ),
    metadata=md,
)
live = changes(watch)
assert live.revision == snapshot.revision + 1 and live.message == "from python", live
assert not live.snapshot and pairs(live) == [("db/timeout", 5)], live
watch.cancel()
refused(
    grpc.StatusCode.NOT_FOUND,
    lambda: next(config.Watch(config_pb2.WatchRequest(namespace=ns, environment="nowhere"), metadata=md, timeout=10)),
    "a watch of a missing environment",
)

# queue: a queue, a job enqueued, leased and acked.
queue = queue_pb2_grpc.QueueServiceStub(channel)
qname = "py-" + uuid.uuid4().hex[:8]
queue.CreateQueue(queue_pb2.CreateQueueRequest(queue=queue_pb2.Queue(name=qname)), metadata=md)
enq = queue.Enqueue(
    queue_pb2.EnqueueRequest(queue=qname, message=queue_pb2.NewMessage(payload=b"hello", content_type="text/plain")),
    metadata=md,
)
leased = queue.Lease(queue_pb2.LeaseRequest(queue=qname, max_messages=1), metadata=md)
assert len(leased.messages) == 1 and leased.messages[0].message.id == enq.result.message_id, leased
acked = queue.Ack(
    queue_pb2.AckRequest(
        queue=qname,
        acks=[queue_pb2.AckEntry(message_id=enq.result.message_id, lease_token=leased.messages[0].lease_token)],
    ),
    metadata=md,
)
assert list(acked.outcomes) == [queue_pb2.ACK_OUTCOME_ACKED], acked

# audit: an event appended (idempotently), and the signed checkpoint, which is public.
audit = audit_pb2_grpc.AuditServiceStub(channel)
event = audit_pb2.AuditEvent(
    id="py-" + uuid.uuid4().hex,
    action="shop.order.shipped",
    outcome=audit_pb2.OUTCOME_SUCCESS,
    actor=audit_pb2.Actor(id="svc-orders", kind=audit_pb2.ACTOR_KIND_SERVICE_ACCOUNT),
    resource=audit_pb2.Resource(type="shop.order", name="42"),
)
first = audit.Append(audit_pb2.AppendRequest(event=event), metadata=md)
again = audit.Append(audit_pb2.AppendRequest(event=event), metadata=md)
assert not first.duplicate and again.duplicate and again.index == first.index, (first, again)
checkpoint = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest())
assert checkpoint.checkpoint.note.startswith(checkpoint.checkpoint.origin + "\n"), checkpoint
assert len(checkpoint.public_key) == 32, checkpoint

# ai: the models (none configured here), a token estimate, and a clear NOT_FOUND.
ai = ai_pb2_grpc.AiServiceStub(channel)
ai.ListModels(ai_pb2.ListModelsRequest(), metadata=md)
request = ai_pb2.GenerateRequest(
    model="nope",
    messages=[ai_pb2.Message(role=ai_pb2.ROLE_USER, content=[ai_pb2.ContentPart(text="hi")])],
)
e = refused(grpc.StatusCode.NOT_FOUND, lambda: ai.Generate(request, metadata=md), "an unknown model")
assert "nope" in e.details(), e

print("python grpcio stubs: auth, config (with a Watch stream), queue, audit and ai answered as their contracts say")
