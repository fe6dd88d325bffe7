"""LoRA hot-swap: adapters beside one base model, chosen per request, mixed in concurrent use."""

import threading

import grpc
import pytest

from mlxbackend.proto import backend_pb2 as pb
from tests import tiny_model as tm
from tests.conftest import Server
from tests.test_server import make_adapter


def ask(adapter=None, n=30):
    return pb.PredictOptions(
        Prompt=tm.COMPLETION_PROMPT, Tokens=n, Metadata={"lora": adapter} if adapter else {}
    )


@pytest.fixture(scope="module")
def adapters(trained_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(trained_dir, root / "a1", seed=1)
    make_adapter(trained_dir, root / "a2", seed=2)
    return root


def test_hot_swap_matches_fused_and_mixes_in_batches(trained_dir, adapters):
    models = str(trained_dir.parent)
    srv = Server()
    try:
        # references: the base model, and each adapter fused at load
        srv.stub.LoadModel(pb.ModelOptions(Model=str(trained_dir)))
        expected = {None: srv.stub.Predict(ask()).message}
        for name in ("a1", "a2"):
            srv.stub.LoadModel(
                pb.ModelOptions(Model=str(trained_dir), LoraAdapter=str(adapters / name))
            )
            expected[name] = srv.stub.Predict(ask()).message
        assert len(set(expected.values())) == 3

        reply = srv.stub.LoadModel(
            pb.ModelOptions(
                Model=trained_dir.name,
                ModelPath=models,
                Options=[f"lora.a1:{adapters / 'a1'}", f"lora.a2:{adapters / 'a2'}"],
            )
        )
        assert reply.success
        for name in (None, "a1", "a2", "a1", None):  # switching back and forth, no reload
            assert srv.stub.Predict(ask(name)).message == expected[name]

        names = [None, "a1", "a2"] * 3
        got = [None] * len(names)

        def call(i):
            got[i] = b"".join(r.message for r in srv.stub.PredictStream(ask(names[i])))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [expected[n] for n in names]

        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Predict(ask("nope"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "a1" in err.value.details()
        assert srv.healthy()
    finally:
        srv.stop()


def test_missing_adapter_folder_not_found(trained_dir, server, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.LoadModel(
            pb.ModelOptions(Model=str(trained_dir), Options=[f"lora.x:{tmp_path / 'none'}"])
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.healthy()
