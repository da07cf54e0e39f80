"""The `medtl` command: argument parsing, a call into medtl.api, printing. Errors print one line and exit
2 (usage, config) or 1 (a failure while working); see medtl.errors."""
from __future__ import annotations

import argparse
import os
import sys

import medtl
from medtl import jobfiles
from medtl import api
from medtl.errors import MedtlError
from medtl.utils.log import TIMESTAMPS_ENV


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="job config YAML (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=16 (repeatable)")


def _add_ingest_args(p: argparse.ArgumentParser) -> None:
    from medtl.data import decode, tables
    from medtl.data.fields import SAFE_FIELDS

    p.add_argument("--images", required=True,
                   help="folder holding the image files named in the table (for medmnist: the .npz file)")
    p.add_argument("--labels", default=None, help="labels table (CSV); not used by --format medmnist or --unlabeled")
    p.add_argument("--unlabeled", action="store_true",
                   help="no labels table: every DICOM/PNG/JPEG file under --images (recursively) becomes a study "
                        "without labels, e.g. for self-supervised pretraining; patients from DICOM PatientID or "
                        "--patients")
    p.add_argument("--patients", default=None, metavar="CSV",
                   help="with --unlabeled: CSV with an image column (path relative to --images) and a patient column "
                        "(see --image-column, --patient-column); needed for PNG/JPEG, overrides DICOM PatientID")
    p.add_argument("--format", default="chestxray14", choices=tables.FORMATS,
                   help="labels table layout (default chestxray14)")
    p.add_argument("--out", required=True, help="records folder to write (local, s3:// or gs://)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, default=None, help="stored image side in pixels (default 512)")
    size.add_argument("--size-from", default=None, metavar="CONFIG", type=jobfiles.resolve,
                      help="store images at the model input size of this job config (its data.image_size), e.g. "
                           "jobs/chestxray14_b4.yaml, so training reads no pixel it does not use")
    p.add_argument("--bit-depth", type=int, default=16, choices=(8, 16), help="stored bit depth (default 16)")
    p.add_argument("--encoding", default="png", choices=decode.ENCODINGS,
                   help="how shards store images: png (lossless, decoded every epoch; default) or raw (uncompressed "
                        "pixels read without a decode: less CPU per image, larger shards; see docs/ingest.md)")
    p.add_argument("--aspect", default="pad", choices=decode.ASPECT_POLICIES,
                   help="non-square images: pad (letterbox, default), crop (centre) or stretch")
    p.add_argument("--frame", default="middle", choices=decode.FRAME_POLICIES,
                   help="which frame of a multi-frame DICOM to keep (default middle)")
    p.add_argument("--label-names", default=None,
                   help="comma-separated labels to keep, in this order (default: all in the table)")
    p.add_argument("--uncertain", default="ones", choices=tables.UNCERTAIN_POLICIES,
                   help="chexpert: uncertain (-1) labels become 1, 0, or are ignored (masked) (default ones)")
    p.add_argument("--blank", default="mask", choices=tables.BLANK_POLICIES,
                   help="chexpert/multihot: blank labels are masked out of the loss, or read as 0 (default mask)")
    p.add_argument("--image-column", default=None, help="multihot and --patients: the image path column")
    p.add_argument("--patient-column", default=None, help="multihot and --patients: the patient ID column")
    p.add_argument("--split-file", default=None,
                   help="CSV with 'split' and 'patient' (or 'file') columns: use these splits instead of stratifying")
    p.add_argument("--keep-fields", default="",
                   help=f"comma-separated non-identifying fields to store, for subgroup reports: {', '.join(SAFE_FIELDS)} "
                        "(age_band: a band, never an age or a date; site: a salted id unless --site)")
    p.add_argument("--site", default=None, metavar="LABEL",
                   help="a neutral label (e.g. site-a) stored as every study's site field (implies keeping site); "
                        "without it, site is a salted id of the DICOM InstitutionName")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of patients for val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of patients for test (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--shard-mb", type=float, default=150.0, help="target shard size in MB (default 150)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of inputs is quarantined (default 0.01)")
    p.add_argument("--salt-file", default=None,
                   help="secret salt for ID hashes (default $MEDTL_ID_SALT or ~/.config/medtl/id_salt)")
    p.add_argument("--private-map", default=None, metavar="PATH",
                   help="write the map from salted study id (as in quarantine.csv and logs) back to input path to "
                        "this local file, outside the records; written by the finalizing step")
    p.add_argument("--allow-burned-in", action="store_true",
                   help="keep DICOM files whose BurnedInAnnotation is YES (default: quarantine them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtl", description="Distributed transfer learning for multi-label medical image classification.")
    parser.add_argument("--version", action="version", version=f"medtl {medtl.__version__}")
    parser.add_argument("--log-timestamps", action="store_true",
                        help="start each log line with the UTC time (or export MEDTL_LOG_TIMESTAMPS=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write procedurally generated chest-X-ray-like studies",
                       description="Write N synthetic studies to OUT/images and OUT/labels.csv "
                                   "(ChestX-ray14 layout). The same seed gives the same files.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--dicom", action="store_true",
                   help="write 16-bit DICOM files carrying fake patient identifiers instead of PNG")

    p = sub.add_parser("ingest", help="studies + labels table -> sharded, de-identified TFRecords",
                       description="Decode, de-identify, split by patient and shard studies into TFRecords "
                                   "(with --unlabeled: every image under --images, without labels). "
                                   "With --num-workers K, run K of these (--worker-index 0..K-1, e.g. a Kubernetes "
                                   "Indexed Job), then `medtl ingest-finalize`.")
    _add_ingest_args(p)
    p.add_argument("--workers", type=int, default=1, help="local decode processes (default 1)")
    p.add_argument("--worker-index", type=int, default=None,
                   help="this worker's index in a partitioned ingest (0..K-1); finalize afterwards")
    p.add_argument("--num-workers", type=int, default=1, help="workers in a partitioned ingest (default 1)")

    p = sub.add_parser("ingest-finalize", help="merge the parts of a partitioned ingest into the final records",
                       description="After K `medtl ingest --worker-index i --num-workers K` runs: name the shards, "
                                   "write manifest.json and quarantine.csv. Pass the same ingest options.")
    _add_ingest_args(p)
    p.add_argument("--num-workers", type=int, required=True, help="number of workers that wrote parts")

    p = sub.add_parser("verify", help="check every shard against the manifest",
                       description="Check existence, byte size, SHA-256 and every record of every shard listed in "
                                   "RECORDS/manifest.json. Exits 1 naming the first damaged shard.")
    p.add_argument("records", help="records folder (local, s3:// or gs://)")
    p.add_argument("--quick", action="store_true", help="only existence and sizes (what training checks at start)")

    p = sub.add_parser("train", help="phased transfer-learning training (horovodrun-aware)",
                       description="Train the phases of a job config. Run under horovodrun for several ranks.")
    _add_config_args(p)
    p.add_argument("--workdir", required=True, help="run folder for config, history and checkpoints")
    p.add_argument("--until-phase", metavar="NAME", default=None,
                   help="stop after this phase (by name); the same command with the same --workdir resumes "
                        "with the next phase (for clusters that limit job length)")

    p = sub.add_parser("pretrain", help="pretrain the base in-domain; writes RUN/base.weights.h5 for model.weights",
                       description="Train the configured backbone by the config's pretrain.method (supervised: the "
                                   "phases on data.records' labels; simclr: self-supervised, labels unused), then "
                                   "write the base file RUN/base.weights.h5 and its sidecar. Run under horovodrun "
                                   "for several ranks.")
    _add_config_args(p)
    p.add_argument("--workdir", required=True, help="run folder for config, history, checkpoints and the base file")

    p = sub.add_parser("search", help="budgeted search for a classification head, on cached base features",
                       description="Successive halving over the head space of --space (Optuna), training heads on "
                                   "a cache of the frozen base's features. --budget counts full trainings (phase 1's "
                                   "epochs). Writes best.yaml (a job config for `medtl train`), leaderboard.csv and "
                                   "search.html into --workdir. Re-run the same command to resume.")
    _add_config_args(p)
    p.add_argument("--space", required=True, type=jobfiles.resolve,
                   help="search space YAML (see jobs/search/heads.yaml)")
    p.add_argument("--budget", required=True, type=float, help="budget in full trainings of one head, e.g. 8")
    p.add_argument("--workdir", required=True, help="search folder (study.db, best.yaml, leaderboard.csv, search.html)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by several workers, e.g. postgresql://USER:PASSWORD@HOST/DB "
                        "(default $MEDTL_SEARCH_STORAGE, else sqlite:///WORKDIR/study.db)")
    p.add_argument("--study-name", default=None, help="study name in the storage (default medtl-head-search)")
    p.add_argument("--fractions", default=None,
                   help="subset transfer: run the search on nested, patient-level fractions of the train split, "
                        "e.g. 0.1,0.3,1.0 (val fixed), compare each ranking with the largest fraction's and draw "
                        "the best head's learning curve (default search.fractions)")

    p = sub.add_parser("evaluate", help="per-label metrics with intervals and an HTML report",
                       description="Evaluate a run's best checkpoint (--workdir), or an exported model "
                                   "(--model) on a records folder (--records), on one split. Operating "
                                   "thresholds are tuned on the val split (never test) and saved in "
                                   "RUN/thresholds.json when missing or stale.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run folder written by `medtl train`")
    source.add_argument("--model", help="SavedModel folder written by `medtl export` (needs --records)")
    p.add_argument("--records", help="records folder to evaluate an exported model on (with --model)")
    p.add_argument("--label-map", metavar="MAP.yaml", type=jobfiles.resolve,
                   help="with --model: YAML of `model label: records label` lines for records whose labels are "
                        "named otherwise (e.g. another site's); the mapped labels are scored, the others listed")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--out", default=None,
                   help="report folder (report.html, metrics.json, per_label.csv, predictions.npz); default "
                        "RUN/reports/SPLIT with --workdir, required with --model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluate.* setting, e.g. --set evaluate.calibration=temperature, "
                        "--set evaluate.subgroups=[sex,age_band] (repeatable)")

    p = sub.add_parser("compare", help="per-label AUROC of several reports side by side, paired bootstrap",
                       description="Compare evaluation reports of the same split (e.g. two heads, phases "
                                   "or runs): per-label AUROC, differences to the first report, and a paired "
                                   "patient-level bootstrap test of each difference.")
    p.add_argument("reports", nargs="+", metavar="REPORT", help="report folders written by `medtl evaluate`")
    p.add_argument("--out", help="also write the comparison as CSV (one row per label and report)")
    p.add_argument("--resamples", type=int, default=None,
                   help="bootstrap resamples (default: the first report's evaluate.bootstrap)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default: the first report's)")

    p = sub.add_parser("export", help="a TensorFlow SavedModel with preprocessing, labels and thresholds",
                       description="Export a run's best checkpoint as a SavedModel whose signatures take "
                                   "encoded PNG/JPEG bytes or float images and return per-label "
                                   "(calibrated, with evaluate.calibration) probabilities and decisions at the "
                                   "val-tuned thresholds, with MODEL_CARD.md and MODEL_CARD.json beside it.")
    p.add_argument("--workdir", required=True, help="run folder written by `medtl train`")
    p.add_argument("--out", required=True, help="SavedModel folder to write (must not exist or be empty)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluate.* setting (calibration, threshold policy, tta), e.g. "
                        "--set evaluate.calibration=platt")
    p.add_argument("--intended-use", default=None, metavar="TEXT",
                   help="the model card's intended use (default: research use only, not a medical device)")
    p.add_argument("--limitation", dest="limitations", action="append", default=[], metavar="TEXT",
                   help="a known limit for the model card, beside those medtl finds (repeatable)")

    p = sub.add_parser("predict", help="batch inference of an exported model on DICOM/PNG/JPEG files",
                       description="Predict new studies with a `medtl export` SavedModel, through the same "
                                   "decode path as ingest. One CSV row per file; files that cannot be "
                                   "decoded get a row with the reason.")
    p.add_argument("--model", required=True, help="SavedModel folder written by `medtl export`")
    p.add_argument("--images", required=True,
                   help="folder of study files (searched recursively), or a CSV with a 'path' column")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--ids-only", action="store_true",
                   help="name each file by its salted study id instead of its path (the ids ingest gives the same "
                        "files under the same salt and folder)")
    p.add_argument("--salt-file", default=None,
                   help="with --ids-only: secret salt (default $MEDTL_ID_SALT or ~/.config/medtl/id_salt)")
    p.add_argument("--saliency", metavar="DIR", default=None,
                   help="also write Grad-CAM overlays: DIR/<file's name in the CSV>/<label>.png and <label>.heatmap.png "
                        "(they show the images' pixels, which can carry burned-in text)")

    p = sub.add_parser("demo", help="transfer learning end to end on built-in synthetic data",
                       description="Synthesise an archive and a target set of studies, pretrain the base on the "
                                   "archive's findings, train the target job's phases from it (and its head phase "
                                   "on a random base, the control), evaluate the test split (its time on 2 cores: "
                                   "see the README).")
    p.add_argument("--out", required=True, help="demo folder")
    p.add_argument("--config", default=jobfiles.job_file("demo.yaml"),
                   help="target job config (default jobs/demo.yaml)")
    p.add_argument("--pretrain-config", default=jobfiles.job_file("demo_pretrain.yaml"),
                   help="pretraining job config (default jobs/demo_pretrain.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of both configs (repeatable)")
    p.add_argument("--n", type=int, default=5000, help="synthetic target studies (default 5000)")
    p.add_argument("--archive-n", type=int, default=6000, help="synthetic archive studies (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default 0)")

    p = sub.add_parser("bench", help="throughput benchmarks, as ratios against a baseline in the same run",
                       description="Benchmarks print ratios against a baseline measured in the same run.")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("ingest", help="ingest images/s: N local workers against 1",
                         description="Ingest the same synthetic DICOM studies with 1 worker and with N; print images/s "
                                     "and the ratio.")
    b.add_argument("--n", type=int, default=400, help="studies (default 400)")
    b.add_argument("--workers", type=int, default=0, help="workers to compare with 1 (default: all cores)")
    b.add_argument("--source-size", type=int, default=1024, help="DICOM side in pixels (default 1024)")
    b.add_argument("--image-size", type=int, default=512, help="stored side in pixels (default 512)")
    b.add_argument("--repeats", type=int, default=1, help="runs per setting; the best counts (default 1)")
    b.add_argument("--keep", default=None, help="work folder to keep (and reuse) the studies and records in")

    b = bench.add_parser("train", help="medtl train against plain model.fit, and 2 ranks against 1",
                         description="Images/s of medtl's training path against a plain model.fit on in-memory "
                                     "tensors (same model, phase, batch); with --scaling, horovodrun -np 2 against "
                                     "-np 1 at one thread per rank.")
    _add_config_args(b)
    b.add_argument("--records", default=None, help="records to train on (default: synthesised and ingested)")
    b.add_argument("--epochs", type=int, default=4, help="epochs per measurement; the first is excluded (default 4)")
    b.add_argument("--n", type=int, default=800, help="synthetic studies when --records is not given (default 800)")
    b.add_argument("--phase", type=int, default=-1, help="index of the config's phase to time (default: the last)")
    b.add_argument("--scaling", action="store_true", help="also measure horovodrun -np 2 against -np 1")
    b.add_argument("--keep", default=None, help="work folder to keep (and reuse)")

    b = bench.add_parser("search", help="head trials on cached features vs with the frozen base; search vs exhaustive",
                         description="In one run: feature extraction time; one head trial on cached features against "
                                     "the same trial with the frozen base run every epoch; and a search with a budget "
                                     "of N/4 full trainings against training all N heads of the space on the cache.")
    _add_config_args(b)
    b.add_argument("--space", required=True, type=jobfiles.resolve,
                   help="search space YAML (>= 24 heads for the comparison)")
    b.add_argument("--records", default=None, help="records to use (default: synthesised and ingested)")
    b.add_argument("--n", type=int, default=1000, help="synthetic studies when --records is not given (default 1000)")
    b.add_argument("--trial-epochs", type=int, default=3, help="epochs of the timed trial, both ways (default 3)")
    b.add_argument("--budget", type=float, default=None, help="search budget in full trainings (default N/4)")
    b.add_argument("--seeds", default="0", help="seeds to run the search and the exhaustive pass with (default 0)")
    b.add_argument("--fraction", type=float, default=0.25,
                   help="subset transfer: also rank every head on this fraction of the train split and compare with "
                        "the full split (Kendall's tau); 1 turns it off (default 0.25)")
    b.add_argument("--base", default=None, help="a base file (`medtl pretrain`) the heads sit on (default: "
                                                "model.weights, else one pretrained here on a synthetic archive)")
    b.add_argument("--pretrain-config", default=jobfiles.job_file("demo_pretrain.yaml"),
                   help="pretraining job config when the base is pretrained here (default jobs/demo_pretrain.yaml)")
    b.add_argument("--archive", default=None, help="records to pretrain the base on (default: synthesised)")
    b.add_argument("--archive-n", type=int, default=3000, help="synthetic archive studies (default 3000)")
    b.add_argument("--keep", default=None, help="work folder to keep (and reuse)")

    b = bench.add_parser("pretrain", help="a pretrained base + the phases against scratch, per label budget",
                         description="For each fraction of the target's train labels (nested, patient-level "
                                     "subsets), the target job's phases from an in-domain pretrained base against "
                                     "training from scratch on the same budget, scored on the same test split. "
                                     "Without --records: the demo's synthetic archive and target sets.")
    b.add_argument("--config", default=jobfiles.job_file("demo.yaml"), help="target job config (default jobs/demo.yaml)")
    b.add_argument("--pretrain-config", default=jobfiles.job_file("demo_pretrain.yaml"),
                   help="pretraining job config (default jobs/demo_pretrain.yaml)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of both configs (repeatable)")
    b.add_argument("--fractions", default="0.05,0.25,1", help="fractions of the train labels (default 0.05,0.25,1)")
    b.add_argument("--records", default=None, help="target records (default: synthesised as the demo's)")
    b.add_argument("--archive", default=None, help="records to pretrain on (with --records, unless --base)")
    b.add_argument("--base", default=None, help="a base file to use instead of pretraining one")
    b.add_argument("--n", type=int, default=5000, help="synthetic target studies without --records (default 5000)")
    b.add_argument("--archive-n", type=int, default=6000, help="synthetic archive studies (default 6000)")
    b.add_argument("--keep", default=None, help="work folder to keep (and reuse: finished runs are not trained again)")

    b = bench.add_parser("input", help="images/s of each input-pipeline stage vs naive loaders",
                         description="Images/s, per run and per CPU core, of (a) read + parse, (b) + decode + resize, "
                                     "(c) + the default augmentation over PNG shards, (d) image_dataset_from_directory "
                                     "and (e) a PIL loop over the same images, and (a-raw) to (c-raw) over decode-free "
                                     "raw shards of the same studies at --image-size; with the ratios, the pixels "
                                     "decoded per pixel used, and cores per GPU.")
    b.add_argument("--records", default=None,
                   help="records folder to read (its train split); default: synthesise --n studies at --source-size")
    b.add_argument("--image-size", type=int, default=380, help="side the stream resizes to (default 380)")
    b.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    b.add_argument("--seconds", type=float, default=8.0, help="measured seconds per stage and round (default 8)")
    b.add_argument("--rounds", type=int, default=3, help="rounds over all stages; medians are kept (default 3)")
    b.add_argument("--n", type=int, default=256, help="synthetic studies without --records (default 256)")
    b.add_argument("--source-size", type=int, default=512,
                   help="side of the synthetic 16-bit shards without --records (default 512)")
    b.add_argument("--max-png", type=int, default=512,
                   help="records exported as PNG files for (d), (e), and, with --records, rewritten in the other "
                        "encoding for its stages (default 512)")
    b.add_argument("--work", default=None, help="folder for the synthetic shards and PNG files (default: temporary)")
    b.add_argument("--alternatives", action="store_true",
                   help="also measure other ways to augment: one numpy_function call per image, TF-native ops")

    p = sub.add_parser("k8s", help="Kubernetes manifests (k8s/): render an overlay",
                       description="The kustomize base and overlays in k8s/ run ingest, training and evaluation "
                                   "on a cluster with the Kubeflow mpi-operator; see the README.")
    k8s = p.add_subparsers(dest="k8s", required=True, metavar="ACTION")
    r = k8s.add_parser("render", help="print an overlay's manifests: `kubectl kustomize k8s/overlays/NAME`, checked",
                       description="Print the manifests of k8s/overlays/NAME (multi-document YAML), as `kubectl "
                                   "kustomize` builds them (kubectl must be installed), for review or `kubectl "
                                   "apply -f -`; --set and --image are checked and applied on top.")
    r.add_argument("--overlay", required=True, help="folder name in k8s/overlays, e.g. cpu-smoke, gpu, chestxray14-b4")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override added to the training command, checked against its job config "
                        "(repeatable), e.g. --set train.batch_size=16")
    r.add_argument("--image", default=None, help="image of every container, e.g. registry.local/medtl:0.1.0")

    sub.add_parser("env", help="print versions of the stack and the GPUs seen",
                   description="Print TensorFlow, tf-keras, Horovod, tensorflow-io and albumentations versions.")
    return parser


def cmd_synth(args) -> int:
    from medtl.utils.log import log

    if args.n < 1:
        raise MedtlError(f"--n must be >= 1, got {args.n}")
    if args.size < 32:
        raise MedtlError(f"--size must be >= 32, got {args.size}")
    result = api.synth(args.out, args.n, args.seed, args.size, args.dicom)
    log(f"synth: {result.num_images} images of {result.num_patients} patients in {args.out}; prevalence "
        + ", ".join(f"{k} {v:.1%}" for k, v in result.prevalence.items()))
    return 0


def _ingest_options(args) -> api.IngestOptions:
    def names(text):
        return tuple(n.strip() for n in text.split(",") if n.strip()) if text else ()

    if args.size_from:
        from medtl.data.ingest import image_size_from_job

        image_size = image_size_from_job(args.size_from)
    else:
        image_size = api.IngestOptions.image_size if args.image_size is None else args.image_size
    return api.IngestOptions(
        images=args.images, labels=args.labels, out=args.out, format=args.format, image_size=image_size,
        bit_depth=args.bit_depth, encoding=args.encoding, aspect=args.aspect, frame=args.frame, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, shard_mb=args.shard_mb,
        workers=getattr(args, "workers", 1), max_bad_fraction=args.max_bad_fraction, salt_file=args.salt_file,
        label_names=names(args.label_names) or None, uncertain=args.uncertain, blank=args.blank,
        image_column=args.image_column, patient_column=args.patient_column, split_file=args.split_file,
        keep_fields=names(args.keep_fields), private_map=args.private_map, allow_burned_in=args.allow_burned_in,
        unlabeled=args.unlabeled, patients=args.patients, site=args.site)


def cmd_ingest(args) -> int:
    opt = _ingest_options(args)
    if args.worker_index is None:
        if args.num_workers != 1:
            raise MedtlError("--num-workers needs --worker-index (this worker's index, 0..K-1)")
        api.ingest(opt)
    else:
        api.ingest_part(opt, args.worker_index, args.num_workers)
    return 0


def cmd_ingest_finalize(args) -> int:
    api.ingest_finalize(_ingest_options(args), args.num_workers)
    return 0


def cmd_verify(args) -> int:
    from medtl.data.verify import verify_records

    verify_records(args.records, deep=not args.quick)
    return 0


def cmd_train(args) -> int:
    api.train(args.config, args.workdir, args.overrides, until_phase=args.until_phase)
    return 0


def cmd_pretrain(args) -> int:
    from medtl.utils.log import is_primary  # only rank 0 prints, as only it logs

    result = api.pretrain(args.config, args.workdir, args.overrides)
    if is_primary():
        print(result.base_weights)
    return 0


def cmd_search(args) -> int:
    api.search(args.config, args.space, args.budget, args.workdir, args.overrides, args.storage, args.study_name,
               args.fractions)
    return 0


def cmd_evaluate(args) -> int:
    if args.workdir and args.records:
        raise MedtlError("--records goes with --model; a run folder (--workdir) evaluates its own records")
    if args.model and not args.records:
        raise MedtlError("--model needs --records: the records folder (from `medtl ingest`) to evaluate it on")
    if args.model and not args.out:
        raise MedtlError("--model needs --out REPORT: only a run folder (--workdir) has a default report folder "
                         "(RUN/reports/SPLIT)")
    if args.label_map and not args.model:
        raise MedtlError("--label-map goes with --model and --records: it maps an export's labels to those of "
                         "other records")
    api.evaluate(args.workdir, out=args.out, model=args.model, records=args.records, split=args.split,
                 overrides=args.overrides, label_map=args.label_map)
    return 0


def cmd_compare(args) -> int:
    from medtl.evaluate.compare import compare_reports

    print(compare_reports(args.reports, args.out, args.resamples, args.seed))
    return 0


def cmd_export(args) -> int:
    api.export(args.workdir, args.out, args.overrides, args.intended_use, args.limitations)
    return 0


def cmd_predict(args) -> int:
    if args.batch_size < 1:
        raise MedtlError(f"--batch-size must be >= 1, got {args.batch_size}")
    api.predict(args.model, args.images, args.out, args.batch_size, ids_only=args.ids_only, salt_file=args.salt_file,
                saliency=args.saliency)
    return 0


def cmd_demo(args) -> int:
    from medtl.demo import run_demo

    for flag, value in (("--n", args.n), ("--archive-n", args.archive_n)):
        if value < 20:
            raise MedtlError(f"{flag} must be >= 20 (the splits need patients), got {value}")
    run_demo(args.out, args.config, args.overrides, n=args.n, seed=args.seed, pretrain_config=args.pretrain_config,
             archive_n=args.archive_n)
    return 0


def cmd_bench(args) -> int:
    if args.bench == "ingest":
        from medtl.bench import ingest as bench_ingest

        if args.n < 1:
            raise MedtlError(f"--n must be >= 1, got {args.n}")
        bench_ingest.run(args.n, args.workers, args.source_size, args.image_size, args.repeats, args.keep)
    elif args.bench == "train":
        from medtl.bench import train as bench_train

        if args.epochs < 2:
            raise MedtlError(f"--epochs must be >= 2 (the first epoch is excluded), got {args.epochs}")
        cfg = api.load_job_config(args.config, args.overrides)
        records = os.path.abspath(args.records) if args.records and "://" not in args.records else args.records
        if not -len(cfg.phases) <= args.phase < len(cfg.phases):
            raise MedtlError(f"--phase {args.phase}: the config has {len(cfg.phases)} phase(s)")
        bench_train.run(cfg, records, args.epochs, args.n, args.scaling, args.keep, args.phase)
    elif args.bench == "search":
        from medtl.bench import search as bench_search

        cfg = api.load_job_config(args.config, args.overrides)
        records = os.path.abspath(args.records) if args.records and "://" not in args.records else args.records
        if args.trial_epochs < 1:
            raise MedtlError(f"--trial-epochs must be >= 1, got {args.trial_epochs}")
        if not 0 < args.fraction <= 1:
            raise MedtlError(f"--fraction must be in (0, 1], got {args.fraction:g}")
        seeds = bench_search.parse_seeds(args.seeds)
        pre_cfg = None if args.base else api.load_job_config(args.pretrain_config, [])  # its own schedule
        paths = {name: os.path.abspath(value) if value and "://" not in value else value
                 for name, value in (("base", args.base), ("archive", args.archive))}
        bench_search.run(cfg, args.space, records, args.n, args.trial_epochs, args.budget, args.keep, seeds,
                         args.fraction if args.fraction < 1 else None, paths["base"], pre_cfg, paths["archive"],
                         args.archive_n)
    elif args.bench == "pretrain":
        from medtl.bench import pretrain as bench_pretrain

        fractions = bench_pretrain.parse_fractions(args.fractions)
        cfg = api.load_job_config(args.config, args.overrides)
        pre_cfg = api.load_job_config(args.pretrain_config, args.overrides)
        paths = {name: os.path.abspath(value) if value and "://" not in value else value
                 for name, value in (("records", args.records), ("archive", args.archive), ("base", args.base))}
        if paths["base"] and not os.path.isfile(paths["base"]):
            raise MedtlError(f"--base {args.base} is not a file; pass a base file written by `medtl pretrain`")
        bench_pretrain.run(cfg, pre_cfg, fractions, paths["records"], paths["archive"], paths["base"], args.n,
                           args.archive_n, args.keep)
    elif args.bench == "input":
        from medtl.bench.input import BenchOptions, run_bench

        run_bench(BenchOptions(records=args.records, image_size=args.image_size, batch_size=args.batch_size,
                               seconds=args.seconds, rounds=args.rounds, n=args.n, source_size=args.source_size,
                               max_png=args.max_png, work=args.work, alternatives=args.alternatives))
    return 0


def cmd_k8s(args) -> int:
    from medtl.k8s.render import render, to_yaml

    objects = render(args.overlay, args.overrides, args.image)
    command = " ".join(["medtl k8s render --overlay", args.overlay, *(f"--set {o}" for o in args.overrides),
                        *([f"--image {args.image}"] if args.image else [])])
    sys.stdout.write(to_yaml(objects, header=f"{command}  (from k8s/overlays/{args.overlay})"))
    return 0


def cmd_env(args) -> int:
    from medtl.env import describe

    print(describe())
    return 0


COMMANDS = {"synth": cmd_synth, "ingest": cmd_ingest, "ingest-finalize": cmd_ingest_finalize, "verify": cmd_verify,
            "train": cmd_train, "pretrain": cmd_pretrain, "search": cmd_search, "evaluate": cmd_evaluate,
            "compare": cmd_compare, "export": cmd_export, "predict": cmd_predict, "demo": cmd_demo, "bench": cmd_bench, "k8s": cmd_k8s, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_timestamps:  # through the environment, so that worker processes stamp their lines too
        os.environ[TIMESTAMPS_ENV] = "1"
    try:
        code = COMMANDS[args.command](args)
    except MedtlError as exc:
        from medtl.utils.log import error

        error(str(exc))
        code = exc.exit_code
        if "tensorflow" in sys.modules:
            # Leave without tearing down TensorFlow: destroying a tf.data iterator that an error
            # interrupted can deadlock against an in-flight numpy_function (augmentation) waiting
            # for the GIL (seen here: a damaged shard met mid-training hung the process).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    except KeyboardInterrupt:
        from medtl.utils.log import error

        error("interrupted")
        code = 130
    if "tensorflow_io" in sys.modules:
        # tensorflow-io's s3 filesystem aborts at interpreter exit ("pure virtual method
        # called"), turning a success into a crash; leave before that teardown runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
