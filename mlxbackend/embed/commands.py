"""`mlxbackend embed`: embed texts (or rerank documents) for a quick check, locally or through
a running backend (--addr)."""

import json
import sys

from mlxbackend.client import connect, failure_text, local_or_remote
from mlxbackend.embed.engine import EmbedSettings, Ranked, Reranking, embed_inputs, rerank_scores
from mlxbackend.options import parse_options
from mlxbackend.text.models import LoadSpec, load_text_model


def add_parser(sub):
    p = sub.add_parser(
        "embed", help="embed texts, or rerank them against --rerank QUERY (local, or --addr)"
    )
    p.add_argument("texts", nargs="+", help="texts to embed (the documents with --rerank)")
    p.add_argument("--model", default="", help="encoder (BERT family) or LLM folder; local mode")
    p.add_argument(
        "--addr",
        default="",
        help="use a running backend at HOST:PORT instead (LoadModel already done)",
    )
    p.add_argument(
        "--rerank", metavar="QUERY", default="", help="score the texts against QUERY, best first"
    )
    p.add_argument("--top-n", type=int, default=0, help="with --rerank: keep the best N (0 = all)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="LoadModel option key:value (pooling, normalize…)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_embed)


def run_local(args):
    """(vectors or None, reranking or None) computed in this process."""
    from pathlib import Path

    from mlxbackend.embed.bert import is_encoder_dir, load_encoder

    options = parse_options(args.option)
    settings = EmbedSettings.from_options(options)
    path = Path(args.model)
    if path.is_dir() and is_encoder_dir(path):
        kind, model = (
            "encoder",
            load_encoder(
                path,
                pooling=settings.pooling or None,
                normalize=settings.normalize,
                max_length=settings.max_tokens or None,
            ),
        )
    else:
        kind, model = (
            "decoder",
            load_text_model(LoadSpec(model=str(path.resolve()), options=options)),
        )
    if args.rerank:
        scores, tokens = rerank_scores(kind, model, settings, args.rerank, args.texts)
        order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[: args.top_n or None]
        return None, Reranking(
            [Ranked(i, args.texts[i], float(scores[i])) for i in order], int(tokens)
        )
    vectors, _ = embed_inputs(kind, model, settings, args.texts)
    return vectors, None


def run_remote(args):
    import numpy as np

    from mlxbackend.proto import backend_pb2 as pb

    stub = connect(args.addr)
    if args.rerank:
        r = stub.Rerank(
            pb.RerankRequest(query=args.rerank, documents=args.texts, top_n=args.top_n), timeout=600
        )
        return None, Reranking(
            [Ranked(d.index, d.text, d.relevance_score) for d in r.results], r.usage.total_tokens
        )
    rows = [
        stub.Embedding(pb.PredictOptions(Embeddings=t), timeout=600).embeddings for t in args.texts
    ]
    return np.array(rows, dtype=np.float32), None


def cmd_embed(args):
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    if not local_or_remote(args, err):
        return 2
    try:
        with err.status("embedding" if not args.rerank else "reranking"):
            vectors, ranking = run_remote(args) if args.addr else run_local(args)
    except Exception as exc:  # a BackendError here, or a gRPC error from a running backend
        err.print(f"[red]{failure_text(exc)}[/red]")
        return 1
    if ranking is not None:
        if args.json:
            print(
                json.dumps(
                    {"results": [r.__dict__ for r in ranking.results], "tokens": ranking.tokens}
                )
            )
            return 0
        table = Table("rank", "index", "score", "document", title=f"rerank: {args.rerank}")
        for rank, r in enumerate(ranking.results, 1):
            table.add_row(str(rank), str(r.index), f"{r.score:.4f}", r.text[:80])
        out.print(table)
        err.print(f"[dim]{ranking.tokens} tokens[/dim]")
        return 0
    if args.json:
        print(json.dumps({"embeddings": vectors.tolist()}))
        return 0
    table = Table("text", "dims", "norm", "first values")
    for text, v in zip(args.texts, vectors, strict=True):
        table.add_row(
            text[:50], str(len(v)), f"{np.linalg.norm(v):.4f}", " ".join(f"{x:+.3f}" for x in v[:6])
        )
    out.print(table)
    if len(vectors) > 1:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = unit @ unit.T
        table = Table("cosine", *[str(i) for i in range(len(vectors))])
        for i, row in enumerate(sims):
            table.add_row(f"{i} {args.texts[i][:30]}", *[f"{x:.3f}" for x in row])
        out.print(table)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="mlxbackend")
    add_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
