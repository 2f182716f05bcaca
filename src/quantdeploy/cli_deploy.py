"""The ``export`` and ``deploy`` commands: from a checkpoint to the formats and manifests other engines
and clusters take (``formats/``, ``deploy/``). Each is seconds of work, so no progress bar; each prints
what it wrote."""

from __future__ import annotations

import argparse

from quantdeploy.cli_types import count


def cmd_export(args: argparse.Namespace) -> int:
    import quantdeploy as qd

    size = qd.export(args.checkpoint, args.out, args.format, args.overwrite, requantize=args.requantize)
    print(f"wrote {args.out} ({args.format}, {size / 1e6:.1f} MB)")
    if args.requantize:
        report_requantization(args)
    return 0


def report_requantization(args: argparse.Namespace) -> None:
    """What ``--requantize`` cost: the KL divergence from our checkpoint to the model the GGUF file holds
    (its converted modules dequantized by the gguf package), on held-out text."""
    import copy
    import json
    from pathlib import Path

    import quantdeploy as qd
    from quantdeploy.demo import default_text_path
    from quantdeploy.eval.compare import compare
    from quantdeploy.eval.fidelity import EvalProtocol
    from quantdeploy.formats import gguf_export

    gguf_file = Path(args.out) / gguf_export.FILE
    names = gguf_export.requantized_modules(gguf_file)
    if not names:
        print("--requantize: every module was held exactly; nothing was converted")
        return
    ours = qd.load(args.checkpoint)
    converted = copy.deepcopy(ours)  # the same model, its converted modules swapped for the file's
    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    gguf_export.with_gguf_weights(converted.model, config, gguf_file, names)
    text = args.kld_text or str(default_text_path())
    protocol = EvalProtocol(max_tokens=args.kld_tokens, window=min(1024, args.kld_tokens))
    row = compare({"gguf": converted}, ours, text, protocol)[-1]
    print(f"requantized {len(names)} modules; against the checkpoint: mean KLD {row['kld_mean']:.4g} "
          f"(± {row['kld_stderr']:.2g}), top-1 agreement {row['top1_agreement']:.2%} over {row['tokens_scored']} "
          f"tokens of {text}")


def cmd_deploy_k8s(args: argparse.Namespace) -> int:
    from quantdeploy.deploy.kubernetes import K8sSettings, write

    settings = K8sSettings(name=args.name, engine=args.engine, replicas=args.replicas,
                           max_replicas=args.max_replicas or 4 * args.replicas, gpus=args.gpus, image=args.image,
                           model_claim=args.model_claim, memory_gib=args.memory_gib, max_batch=args.max_batch,
                           shutdown_deadline=args.shutdown_deadline)
    files = write(args.checkpoint, settings, args.out, args.overwrite)
    print(f"wrote {args.out}: {', '.join(files)}; apply with: kubectl create secret generic {args.name}-api-key "
          f"--from-literal=api-key=KEY && kubectl apply -k {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add export and deploy to the ``quantdeploy`` parser's subcommands."""
    from quantdeploy.formats import EXPORTERS

    p = sub.add_parser("export", help="write a checkpoint in a format other engines load (vLLM, transformers, "
                                      "llama.cpp)")
    p.add_argument("checkpoint", help="a quantdeploy checkpoint folder")
    p.add_argument("--format", default="compressed-tensors", choices=sorted(EXPORTERS))
    p.add_argument("-o", "--out", required=True, help="output folder (new, or an earlier export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of this format at --out")
    p.add_argument("--requantize", action="store_true",
                   help="gguf: convert specs no GGUF type holds exactly to the nearest type (Q8_0, Q4_0, Q4_1) "
                        "and report the KL divergence that costs")
    p.add_argument("--kld-text", help="text for --requantize's KLD (default: the held-out text that ships with "
                                      "quantdeploy)")
    p.add_argument("--kld-tokens", type=count(2), default=4096, help="tokens of --kld-text to score")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("deploy", help="render deployment manifests for a checkpoint")
    target = p.add_subparsers(dest="target", required=True)
    k = target.add_parser("k8s", help="a kustomize folder: Deployment, Service, HPA on the queue, PDB")
    k.add_argument("checkpoint", help="our checkpoint (--engine quantdeploy) or its compressed-tensors export (vllm)")
    k.add_argument("--engine", choices=["quantdeploy", "vllm"], default="quantdeploy")
    k.add_argument("--name", default="quantdeploy", help="name of every object (and of the Secret NAME-api-key)")
    k.add_argument("--replicas", type=count(1), default=1)
    k.add_argument("--max-replicas", type=count(1), help="HPA ceiling (default: 4 x --replicas)")
    k.add_argument("--gpus", type=count(0), default=0, help="GPUs per pod (vLLM: the tensor-parallel size)")
    k.add_argument("--image", help="container image (default: quantdeploy:VERSION built from deploy/Dockerfile, "
                                   "or vllm/vllm-openai:v0.32.0)")
    k.add_argument("--model-claim", help="PersistentVolumeClaim holding the checkpoint folder (default NAME-models)")
    k.add_argument("--memory-gib", type=count(1), help="memory per pod (default: from the checkpoint's size)")
    k.add_argument("--max-batch", type=count(1), default=16)
    k.add_argument("--shutdown-deadline", type=count(0), default=30)
    k.add_argument("-o", "--out", required=True, help="output folder")
    k.add_argument("--overwrite", action="store_true", help="replace a folder this command rendered")
    k.set_defaults(func=cmd_deploy_k8s)
