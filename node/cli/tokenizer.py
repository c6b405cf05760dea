"""`gossiptrain tokenizer train|info`: train a byte-level BPE tokenizer on your data, or show a tokenizer's fingerprint.

`train` reads the same data a node reads (text files and folders, JSONL, Parquet, `datasets`
folders; --text-field names the text column) and writes a Hugging Face `tokenizers` JSON file.
The same data and vocabulary size give the same file, byte for byte, on every machine, so nodes
may train it themselves or share one file. Pass it to nodes with --tokenizer.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("tokenizer", help="train a BPE tokenizer on your data, or show a tokenizer's fingerprint",
                              description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer and write it as JSON")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH",
                       help="text files/folders, .jsonl, .parquet files or `datasets` save_to_disk folders")
    train.add_argument("--vocab", type=int, required=True, metavar="N",
                       help="vocabulary size, including the 256 bytes and <|endoftext|> (small data may give fewer)")
    train.add_argument("--out", required=True, metavar="FILE", help="the tokenizer JSON file to write")
    train.add_argument("--text-field", default="text", metavar="F", help="the text column of JSONL/Parquet/datasets data")
    train.add_argument("--min-frequency", type=int, default=2, metavar="N", help="merge only pairs seen at least N times")
    info = actions.add_parser("info", help="print a tokenizer file's fingerprint (as in the run manifest) and size")
    info.add_argument("path", help="a `tokenizers` JSON file")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from node.train.data import DataError, iter_texts  # (torch: imported after the CLI's stop handler)
    from node.train.tokenizer import load_tokenizer, train_bpe, write_atomically

    try:
        if args.action == "train":
            text = train_bpe(iter_texts(args.data, args.text_field), args.vocab, args.min_frequency)
            written = write_atomically(args.out, text)
            tokenizer = load_tokenizer(written)
            print(f"wrote {written}: {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint}", flush=True)
        else:
            tokenizer = load_tokenizer(args.path)
            print(f"{args.path}: {tokenizer.vocab_size} tokens, end of document {list(tokenizer.separator)}, "
                  f"fingerprint {tokenizer.fingerprint}", flush=True)
    except DataError as error:
        print(f"gossiptrain tokenizer: error: {error}", file=sys.stderr)
        return 2
    return 0
