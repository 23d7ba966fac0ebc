"""The job spec: one YAML file, one pydantic model, validated once.

Every part (dataprep, trainer, workflow) reads the same `JobSpec`; the resolved spec (after
CLI overrides) is what travels to pods in the ConfigMap, so a pod never re-applies flags.
Errors name the field and the fix, and unknown keys get the closest valid key suggested,
because a typo in a YAML key must not silently fall back to a default on a 16-GPU job.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelora.errors import PipeloraError
from pipelora.families import known_linear_names, model_problems, unknown_targets

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from pipelora.layout import RunLayout

# A release name becomes pod names such as `<name>-dataprep-<5 chars>` and
# `<name>-worker-<index>`, and `job-name` labels (63 chars at most). 40 leaves room for all.
MAX_NAME_LENGTH = 40
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
KNOWN_SCHEMES = ("s3://", "file://")
# dataset.template → the dataset.format values it can render. `alpaca` fills the Alpaca prompt
# from instruction/input/output fields; `chat` renders either format through the chat template.
TEMPLATE_FORMATS: dict[str, tuple[str, ...]] = {"alpaca": ("alpaca",), "chat": ("alpaca", "messages")}


class ConfigError(PipeloraError):
    """A spec the user must fix; `messages` holds one sentence per problem."""

    exit_code = 2

    def __init__(self, messages: list[str], *, source: str | None = None) -> None:
        self.messages = messages
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid job spec{where}:\n" + "\n".join(f"  - {m}" for m in messages))


class SpecWarning(UserWarning):
    """A legal but probably unwanted setting (e.g. a pipeline bubble over a third of the step)."""


def check_uri(value: str, field: str) -> str:
    """Accept `s3://bucket/key`, `file://path` and plain paths; reject schemes nothing here speaks."""
    if not value:
        raise ValueError(f"{field} is empty; give an s3:// URI, a file:// URI or a local path")
    if "://" in value and not value.startswith(KNOWN_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise ValueError(
            f"{field} uses the unsupported scheme '{scheme}://'; use s3:// (with storage.endpoint_url "
            "for MinIO/Ceph), file:// or a local path"
        )
    if value.startswith("s3://") and not value[len("s3://") :].split("/", 1)[0]:
        raise ValueError(f"{field} '{value}' has no bucket; write s3://BUCKET/prefix")
    return value


def check_source_uri(value: str, field: str, *, kind: str) -> str:
    """A model or dataset source: what `check_uri` accepts, or a Hugging Face Hub URI (`pipelora.hub`)."""
    from pipelora.hub import DATASET_GRAMMAR, MODEL_GRAMMAR, is_hub_uri, parse_hub_uri

    if is_hub_uri(value):
        parse_hub_uri(value, field=field, kind=kind)
        return value
    if value and "://" in value and not value.startswith(KNOWN_SCHEMES):
        scheme = value.split("://", 1)[0]
        grammar = MODEL_GRAMMAR if kind == "model" else DATASET_GRAMMAR
        raise ValueError(
            f"{field} uses the unsupported scheme '{scheme}://'; use {grammar} (Hugging Face Hub), s3:// (with "
            "storage.endpoint_url for MinIO/Ceph), file:// or a local path"
        )
    return check_uri(value, field)


def positive(field: str, hint: str) -> AfterValidator:
    """A validator for a number that must be > 0, whose message names the field and a usual value."""

    def check(value: float) -> float:
        if value <= 0:
            raise ValueError(f"{field} must be positive (got {value}); {hint}")
        return value

    return AfterValidator(check)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSpec(_Section):
    """Where the run folder lives. Credentials come from the environment, never from here."""

    uri: str = Field(description="Run storage root: s3://bucket/prefix, file:///path or a local path.")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint for MinIO, Ceph or moto.")
    region: str | None = Field(default=None, description="S3 region; defaults to the credential chain's.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v, "storage.uri")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"storage.endpoint_url '{v}' must start with http:// or https://")
        return v


class ModelSpec(_Section):
    uri: str = Field(description="Hugging Face layout folder (config.json, *.safetensors, tokenizer files), or "
                                 "hf://<org>/<name>[@<revision>] on the Hugging Face Hub.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_source_uri(v, "model.uri", kind="model")


class DatasetSpec(_Section):
    uri: str = Field(description="Dataset file (.json, .jsonl or .parquet), or "
                                 "hf://datasets/<org>/<name>[@<revision>][#<split>] on the Hugging Face Hub.")
    format: Literal["alpaca", "messages"] = "alpaca"
    template: Literal["alpaca", "chat"] = "alpaca"
    seq_len: Annotated[int, positive("dataset.seq_len", "2048 suits a 7B model")] = Field(
        default=2048, description="Tokens per packed row."
    )
    packing: bool = True
    train_on_inputs: bool = False
    eval_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="What to do with an example longer than seq_len."
    )
    max_bad_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Malformed records skipped (and counted) before failing."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_source_uri(v, "dataset.uri", kind="dataset")

    @model_validator(mode="after")
    def _template_fits_format(self) -> DatasetSpec:
        if self.format not in TEMPLATE_FORMATS[self.template]:
            raise ValueError(
                f"dataset.template '{self.template}' cannot render dataset.format '{self.format}' records; "
                "use template: chat for messages data"
            )
        return self


class LoraSpec(_Section):
    r: Annotated[int, positive("lora.r", "8 to 64 is usual")] = 16
    alpha: Annotated[float, positive("lora.alpha", "2 x r is usual")] = 32
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("lora.target_modules is an empty list; name modules (q_proj, v_proj...) or use all-linear")
        known = known_linear_names()
        unknown = unknown_targets(v, known)
        if unknown:
            raise ValueError(
                f"lora.target_modules names {', '.join(unknown)}, which are not linear layers of a supported "
                f"decoder layer; use all-linear or some of {', '.join(known)}"
            )
        return v


class ParallelSpec(_Section):
    stages: int = Field(default=1, ge=1, description="Pipeline stages.")
    nodes: int = Field(default=1, ge=1, description="Worker pods (machines).")
    gpus_per_node: int = Field(default=1, ge=1, description="Ranks per node (GPUs, or processes on CPU).")
    micro_batch_size: int = Field(default=1, ge=1)
    micro_batches: int = Field(default=8, ge=1, description="Micro-batches per optimizer step.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.stages

    # One pipeline's stages sit on consecutive ranks (so on one node where they fit): activations
    # cross stages every micro-batch, while the LoRA gradient all-reduce across replicas is tiny.
    # The trainer's DeepSpeed topology and `logs --stage` both follow this one layout.
    def stage_of_rank(self, rank: int) -> tuple[int, int]:
        """(0-based stage, data-parallel index) of a global rank."""
        return rank % self.stages, rank // self.stages

    def ranks_of_stage(self, stage: int) -> list[int]:
        """Global ranks hosting 0-based `stage`, one per data-parallel replica."""
        return [replica * self.stages + stage for replica in range(self.data_parallel)]


class TrainingSpec(_Section):
    max_steps: int = Field(default=1000, ge=1)
    lr: Annotated[float, positive("training.lr", "1e-4 to 3e-4 is usual for LoRA")] = 2.0e-4
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    seed: int = 1234
    checkpoint_every_steps: int = Field(default=100, ge=1)
    checkpoint_every_minutes: float | None = Field(
        default=None, gt=0,
        description="Also checkpoint when this much time passed since the last one (whichever comes first).",
    )
    keep_checkpoints: int = Field(default=3, ge=1)
    eval_every_steps: int = Field(default=100, ge=1)
    eval_batches: int = Field(default=8, ge=1, description="Micro-batches per eval pass.")
    activation_checkpointing: bool = True
    dtype: Literal["bf16", "fp16", "fp32", "auto"] = Field(
        default="auto", description="auto: bf16 on GPUs, fp32 on CPU."
    )
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="0 disables clipping.")

    @field_validator("dtype")
    @classmethod
    def _no_unscaled_fp16(cls, v: str) -> str:
        if v == "fp16":
            raise ValueError(
                "training.dtype 'fp16' is not supported: without loss scaling fp16 gradients underflow and "
                "training silently stalls; use bf16 (GPUs of the Ampere generation and newer) or fp32"
            )
        return v


class ClusterSpec(_Section):
    """How the Kubernetes release runs; ignored by `pipelora-k8s run`."""

    image: str = Field(default="ghcr.io/pipelora/pipelora-k8s:0.1.0", description="Trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    namespace: str | None = None
    s3_secret: str | None = Field(
        default=None, description="Existing Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
    )
    hf_token_secret: str | None = Field(default=None, description="Existing Secret with HF_TOKEN.")
    gpu_memory_gib: float | None = Field(
        default=None, ge=1,
        description="Memory of one GPU of the cluster (GiB): validate and submit refuse a job whose stages would "
                    "not fit it (as `plan` predicts), and the trainer's partition fits it.",
    )
    values: dict[str, Any] = Field(default_factory=dict, description="Extra Helm values, merged last.")


def parallel_problems(p: ParallelSpec) -> list[str]:
    """Cross-field rules of the parallel section, each as one sentence with the fix."""
    problems: list[str] = []
    if p.world_size % p.stages:
        problems.append(
            f"parallel: nodes x gpus_per_node = {p.nodes} x {p.gpus_per_node} = {p.world_size} ranks "
            f"cannot be split into {p.stages} stages; make it a multiple of parallel.stages"
        )
    if p.micro_batches < p.stages:
        problems.append(
            f"parallel.micro_batches ({p.micro_batches}) is below parallel.stages ({p.stages}): "
            f"some stages would idle every step; set micro_batches >= {p.stages}"
        )
    return problems


class JobSpec(_Section):
    name: str = Field(description="DNS-1035 label: the Helm release and the run folder.")
    storage: StorageSpec
    model: ModelSpec
    dataset: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS_1035.match(v):
            raise ValueError(
                f"name '{v}' is not a DNS-1035 label; use lower-case letters, digits and '-', "
                "starting with a letter and ending with a letter or digit (e.g. alpaca-mistral)"
            )
        if len(v) > MAX_NAME_LENGTH:
            raise ValueError(
                f"name '{v}' has {len(v)} characters; at most {MAX_NAME_LENGTH} leave room for the pod "
                "names derived from it (<name>-worker-N, <name>-dataprep-xxxxx)"
            )
        return v

    @model_validator(mode="after")
    def _parallel_rules(self) -> JobSpec:
        problems = parallel_problems(self.parallel)
        if problems:
            raise ValueError(problems[0])
        return self

    # -- derived ----------------------------------------------------------------------------
    @property
    def run_uri(self) -> str:
        from pipelora.storage import join_uri

        return join_uri(self.storage.uri, self.name)

    @property
    def layout(self) -> RunLayout:
        """Where this run's artifacts live (the one definition, in `pipelora.layout`)."""
        from pipelora.layout import RunLayout

        return RunLayout(self.run_uri)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# -- loading ------------------------------------------------------------------------------------


def _closest_key(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, str | None]:
    """Walk `loc` through nested sections to suggest the valid key nearest a misspelt one."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = current.model_fields.get(str(part)) if current else None
        annotation = field.annotation if field else None
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    bad = str(loc[-1])
    if current is None:
        return bad, None
    match = difflib.get_close_matches(bad, list(current.model_fields), n=1, cutoff=0.5)
    return bad, match[0] if match else None


def _format_error(err: ErrorDetails) -> str:
    loc = tuple(p for p in err["loc"])
    where = ".".join(str(p) for p in loc) or "spec"
    kind = err["type"]
    if kind == "extra_forbidden":
        bad, suggestion = _closest_key(JobSpec, loc)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), suggestion])}'?" if suggestion else ""
        return f"{where}: unknown key '{bad}'{hint}"
    if kind == "missing":
        return f"{where}: required field is missing"
    msg: str = err["msg"]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")  # our validators write whole sentences naming the field
    return f"{where}: {msg} (got {err.get('input')!r})"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"{dotted}: cannot set a key under '{key}', which is not a section"])
        node = child
    node[leaf] = value


def parse_set_option(item: str) -> tuple[str, Any]:
    """`training.max_steps=20` → ("training.max_steps", 20); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError([f"--set '{item}' is not KEY=VALUE (e.g. --set training.max_steps=20)"])
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw else ""


def spec_from_dict(
    data: dict[str, Any], *, overrides: dict[str, Any] | None = None, source: str | None = None
) -> JobSpec:
    """Validate a spec tree after applying dotted-key overrides (CLI flags win over the file)."""
    if not isinstance(data, dict):
        raise ConfigError(["the file must hold a YAML mapping (name:, storage:, model:, ...)"], source=source)
    tree = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        spec = JobSpec.model_validate(tree)
    except ValidationError as exc:
        messages = [_format_error(e) for e in exc.errors()]
        # Cross-field rules run only on a valid tree; report them too so one run lists every problem.
        try:
            parallel = ParallelSpec.model_validate(tree.get("parallel") or {})
        except ValidationError:
            parallel = None
        if parallel is not None:
            messages += [m for m in parallel_problems(parallel) if m not in messages]
        raise ConfigError(messages, source=source) from None
    p = spec.parallel
    if p.stages > 1 and p.micro_batches < 2 * p.stages:  # one stage has no pipeline, so no bubble
        bubble = (p.stages - 1) / (p.micro_batches + p.stages - 1)
        warnings.warn(
            f"parallel.micro_batches ({p.micro_batches}) is below 2 x stages ({2 * p.stages}): the pipeline "
            f"bubble is {bubble:.0%} of each step; raise micro_batches to fill the pipeline",
            SpecWarning,
            stacklevel=2,
        )
    return spec


def load_spec(path: str | Path, *, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read, override and validate a job spec file; every problem is reported at once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file {path} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config file {path}: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path} is not valid YAML{where}: {problem}"], source=str(path)) from None
    return spec_from_dict(data if data is not None else {}, overrides=overrides, source=str(path))


def check_against_model(spec: JobSpec) -> bool:
    """The rules that need the model's `config.json` (its family, and the LoRA targets it has).

    Raises ConfigError listing every problem. Where the config cannot be read (storage out of
    reach, no credentials, no model there yet), warns that the model went unchecked and returns
    False: the trainer checks the same rules when it loads the model.
    """
    from pipelora.hub import is_hub_uri, read_model_config
    from pipelora.storage import join_uri, storage_for

    where = join_uri(spec.model.uri, "config.json")
    try:
        if is_hub_uri(spec.model.uri):  # the run's committed mirror, else the Hub itself
            config = read_model_config(spec)
        else:
            config = storage_for(spec, spec.model.uri).read_json(where)
    except PipeloraError as exc:
        warnings.warn(
            f"could not check the model ({exc}); its model_type and lora.target_modules are checked when "
            "training starts",
            SpecWarning,
            stacklevel=2,
        )
        return False
    if not isinstance(config, dict):
        raise ConfigError([f"model.uri: {where} is not a JSON object; point model.uri at a Hugging Face model folder"])
    problems = model_problems(config, spec.lora.target_modules, where=where)
    if problems:
        raise ConfigError(problems)
    return True


def json_schema() -> dict[str, Any]:
    """The spec's JSON schema, for editor completion (yaml-language-server)."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pipelora-k8s job spec"
    return schema
