"""`openchat-jax convert hf-to-jax | jax-to-hf`: Hugging Face Llama/Mistral folders <-> JAX weights folders."""

from __future__ import annotations

import argparse

from openchat_jax.cli import Subparsers, add_command, add_command_group


def register(subparsers: Subparsers) -> None:
    from openchat_jax.data.template import FAMILIES

    sub = add_command_group(subparsers, "convert", "convert checkpoints between Hugging Face and JAX",
                            dest="direction", metavar="DIRECTION")

    to_jax = add_command(sub, "hf-to-jax", help="HF LlamaForCausalLM / MistralForCausalLM folder (safetensors) -> JAX weights folder")
    to_jax.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
    to_jax.add_argument("--out", required=True, help="weights folder to create (local or gs://)")
    to_jax.add_argument(
        "--add-eot", action="store_true",
        help="append <|end_of_turn|> to the vocab (embedding and LM head rows = mean of existing rows)",
    )
    to_jax.add_argument("--overwrite", action="store_true", help="replace an existing weights folder")
    to_jax.set_defaults(func=_hf_to_jax)

    to_hf = add_command(sub, "jax-to-hf", help="JAX weights folder -> HF LlamaForCausalLM / MistralForCausalLM folder (safetensors)")
    to_hf.add_argument("--ckpt", required=True, help="weights folder (model_config.json + params/)")
    to_hf.add_argument("--out", required=True, help="HF folder to create")
    to_hf.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (default 5GB)")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast tensors (default: as stored)")
    to_hf.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    chat = to_hf.add_argument_group(
        "chat template", "written when the weights folder has tokenizer/ and a class is known: CKPT/classes.json, "
        "--classes-from or --condition-text (default class: the highest weight)",
    )
    chat.add_argument("--condition", help="class whose template prefix the chat template uses")
    chat.add_argument("--condition-text", help="a literal template prefix instead of a class, e.g. GPT4")
    chat.add_argument("--classes-from", help="classes.json / dataset_info.json, or a folder holding one")
    chat.add_argument("--tokenizer", help="tokenizer folder for the chat files (default: CKPT/tokenizer)")
    chat.add_argument("--template", choices=list(FAMILIES),
                      help="template family (default: the one CKPT/classes.json records, else openchat_v3.2)")
    to_hf.set_defaults(func=_jax_to_hf)


def _hf_to_jax(args: argparse.Namespace) -> int:
    from openchat_jax import hf
    from openchat_jax.model import checkpoint_io

    cfg = hf.import_hf(args.hf_dir, args.out, add_eot=args.add_eot, overwrite=args.overwrite)
    eot = checkpoint_io.read_special_tokens(args.out).get("eot_token_id")
    print(
        f"wrote {args.out}: {cfg.num_layers} layers, embed {cfg.embed}, vocab {cfg.vocab_size}, "
        f"{cfg.param_dtype}, eot_token_id={eot}"
    )
    return 0


def _jax_to_hf(args: argparse.Namespace) -> int:
    from openchat_jax import hf

    files = hf.export_hf(
        args.ckpt, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite
    )
    shards = sum(1 for f in files if f.name.endswith(".safetensors"))
    print(f"wrote {args.out}: {shards} safetensors file(s), {len(files)} files in all; {_chat_files(args)}")
    return 0


def _chat_files(args: argparse.Namespace) -> str:
    """Chat template + generation_config.json via openchat_jax.hf.chat_files; returns a summary."""
    from openchat_jax.errors import CheckpointError
    from openchat_jax.infer.classes import find_classes
    from openchat_jax.hf.chat_files import export_chat_files

    chosen = any(v is not None for v in (args.condition, args.condition_text, args.classes_from))
    if not chosen and find_classes(args.ckpt) is None:
        return "no classes recorded, so no chat template (pass --condition-text GPT4 or --classes-from DIR)"
    condition = export_chat_files(
        args.ckpt, args.out, class_name=args.condition, condition_text=args.condition_text,
        classes_from=args.classes_from, tokenizer_path=args.tokenizer, template=args.template,
    )
    if condition is None:
        why = "no tokenizer (no CKPT/tokenizer/, no --tokenizer) or no <|end_of_turn|> row in the model (convert with --add-eot)"
        if chosen:
            raise CheckpointError(f"{args.ckpt}: cannot write a chat template: {why}")
        return f"no chat template: {why}"
    return f"chat template for condition {condition!r}, eos = <|end_of_turn|>"
