"""``cmsei-prep graphs``: spatial graphs and scene graphs of every image, in DATA/graphs/."""

from __future__ import annotations

import argparse

from pipeline.commands.ray_args import add_ray_arguments, ray_options_from_args
from pipeline.graphs_stage import GraphsOptions, build_graphs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "graphs",
        help="build spatial relation graphs and scene graphs for the region shards; write DATA/graphs/",
        description="For every image of DATA/regions, label every ordered region pair with its spatial relation and "
                    "keep the top-K scene-graph triplets, predicted by a relation predictor checkpoint or imported "
                    "from Scene-Graph-Benchmark or VinVL output. One graph shard per region shard, same image order.",
    )
    parser.add_argument("--data", required=True, help="dataset folder with a regions stage; writes DATA/graphs/")
    source = parser.add_argument_group("scene graphs (at most one source; without one, scene graphs stay empty)")
    source.add_argument("--relations", metavar="CKPT", help="relation predictor checkpoint from `cmsei-prep train-relations`")
    source.add_argument("--import-sgb", metavar="PRED", help="Scene-Graph-Benchmark custom_prediction.json")
    source.add_argument("--sgb-info", metavar="INFO", help="the custom_data_info.json of the same run (needed with --import-sgb)")
    source.add_argument("--sgb-min-size", type=int, default=600, help="INPUT.MIN_SIZE_TEST of that run: shorter side of its resized frame in pixels (default: 600)")
    source.add_argument("--sgb-max-size", type=int, default=1000, help="INPUT.MAX_SIZE_TEST of that run: longest side of its resized frame in pixels (default: 1000)")
    source.add_argument("--import-vinvl", metavar="TSV", help="VinVL scene_graph_benchmark predictions.tsv")
    source.add_argument("--vinvl-labelmap", metavar="JSON", help="labelmap JSON with predicate_to_idx for --import-vinvl (default: sorted predicate names of the file)")
    source.add_argument("--match-iou", type=float, default=0.5, help="minimum IoU between an imported box and a region to match them (default: 0.5)")
    parser.add_argument("--top-k", type=int, default=25, help="scene-graph triplets kept per image, highest scores first (default: 25)")
    parser.add_argument("--weight-by-object-scores", action="store_true",
                        help="score a predicted triplet by its predicate probability times both detector confidences (default: the probability alone)")
    parser.add_argument("--device", default="auto", help="device of the relation predictor: auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing graphs stage built from other regions or options")
    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    options = GraphsOptions(
        data=args.data, relations=args.relations, import_sgb=args.import_sgb, sgb_info=args.sgb_info,
        sgb_min_size=args.sgb_min_size, sgb_max_size=args.sgb_max_size, import_vinvl=args.import_vinvl,
        vinvl_labelmap=args.vinvl_labelmap, match_iou=args.match_iou, top_k=args.top_k,
        weight_by_object_scores=args.weight_by_object_scores, device=args.device, overwrite=args.overwrite,
        ray=ray_options_from_args(args),
    )
    return build_graphs(options).exit_code
