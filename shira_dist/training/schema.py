"""The run config: one YAML file drives a training job (``configs/*.yaml``).

Every field is typed and has a default; ``shira_dist.training.config`` loads a YAML file
into these dataclasses, rejects unknown keys and bad values, and applies ``key=value``
overrides. Relative paths are resolved against the directory the job is started from.

    output_dir: runs/x          everything the run writes goes here
    model:       which model (a local HF directory, a packaged model, or an inline config)
    task:        what is learned and scored (causal LM, label-word or head classification)
    data:        where examples come from (local files or a packaged data set, prepared)
    shira:       the adapter (ShiraConfig fields)
    adapter:     shira | lora | dora (PEFT's LoRA/DoRA at the same budget, for an A/B); lora: its options
    training:    steps, batch, optimizer, schedule, precision, eval/log/save cadence, resume
    distributed: single | ddp | fsdp | deepspeed and their options
    tracking:    W&B (offline unless WANDB_API_KEY is set) or none
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

TaskType = Literal["causal_lm", "lm_classification", "sequence_classification"]
Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]
Precision = Literal["auto", "fp32", "bf16"]
ExampleFormat = Literal["auto", "template", "messages", "alpaca", "sharegpt", "prompt_completion"]


@dataclass
class ModelConfig:
    """Exactly one of ``path``, ``builtin`` and ``inline_config``."""

    path: Optional[str] = None  # a local Hugging Face model directory (config.json + weights)
    builtin: Optional[Literal["smollm2-135m-instruct", "all-minilm-l6-v2"]] = None  # packaged offline models
    inline_config: Optional[dict[str, Any]] = None  # {model_type: llama, hidden_size: ...}: random init, no weights
    tokenizer: Optional[str] = None  # None: the model's own; "bytes": built-in byte tokenizer; or a local directory
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the frozen base weights
    cache_dir: Optional[str] = None  # converted models; None: $SHIRA_DIST_CACHE or ~/.cache/shira_dist
    # The frozen base's linear layers quantized under the adapter (training/quantize.py): torchao
    # int8_weight_only / int4_weight_only (CPU or CUDA), bitsandbytes nf4 (CUDA). lm_head, embeddings
    # and modules_to_save stay float; the saved adapter is scored on the float base after training.
    quantization: Optional[Literal["int8_weight_only", "int4_weight_only", "nf4"]] = None


@dataclass
class TaskConfig:
    type: TaskType = "causal_lm"
    # How a row becomes an example (training/formats.py): template (the two templates below), messages
    # (OpenAI role/content lists through the tokenizer's chat template), alpaca, sharegpt, prompt_completion.
    # auto: from the columns (messages, conversations, instruction+output, prompt+completion, else template);
    # a task that sets its own template, and every classification task, reads template rows.
    format: ExampleFormat = "auto"
    # Python format string over an example's fields, e.g. "Review: {text}\nSentiment:".
    prompt_template: str = "{text}"
    # causal_lm only: the text the loss is taken on, after the prompt (None: loss on the whole prompt).
    response_template: Optional[str] = None
    # messages/sharegpt: the loss on assistant turns only (TRL's SFTConfig name; TRL's default is false);
    # false: on every token. alpaca and prompt_completion always take it on the response only.
    assistant_only_loss: bool = True
    label_field: str = "label"  # classification: the field holding the label value
    labels: Optional[list[str]] = None  # classification: the label values, in class-index order
    label_words: Optional[list[str]] = None  # lm_classification: one single-token word per label, same order
    max_length: int = 128  # tokens per example (longer prompts are cut from the left of the text)
    # causal_lm only (TRL's SFTConfig name): pack several training examples into each row of up to
    # max_length tokens (best-fit decreasing), attention and loss kept inside each example
    # (training/packing.py); micro_batch_size then counts packed rows. Evaluation stays one example per row.
    packing: bool = False
    # causal_lm only: prompts the model answers greedily before and after training (logged, and kept in
    # <output_dir>/samples.json; training/samples.py), as user turns through the chat template when the
    # task reads chat data. Strategies single and ddp (rank 0 generates); byte tokenizer not supported.
    sample_prompts: list[str] = field(default_factory=list)
    sample_max_new_tokens: int = 48


@dataclass
class DataConfig:
    # A packaged data set written to <output_dir>/data/{train,eval}.jsonl by the job itself;
    # then train_files/eval_files must be empty.
    prepare: Optional[Literal["rotten_tomatoes", "chatterbot", "fortunes", "synthetic_sentiment"]] = None
    train_files: list[str] = field(default_factory=list)  # local csv/json/jsonl/parquet/txt files
    eval_files: list[str] = field(default_factory=list)  # held-out files (empty: no evaluation)
    format: Optional[Literal["csv", "json", "parquet", "text"]] = None  # None: from the file extension
    max_train_examples: Optional[int] = None  # keep the first N training examples
    max_eval_examples: Optional[int] = None  # keep the first N held-out examples
    cache_dir: Optional[str] = None  # datasets' Arrow cache; None: <output_dir>/cache/datasets


@dataclass
class ShiraSection:
    r: int = 32  # r*(in+out) trainable entries per targeted (out, in) layer
    mask_type: Literal["random", "struct", "weight_magnitude", "gradient", "snip"] = "random"
    target_modules: Optional[Union[list[str], str]] = None  # names/suffixes, a regex, "all-linear", None: model default
    random_seed: Optional[int] = 0  # None: a fresh mask (rank 0's is broadcast to all ranks)
    modules_to_save: Optional[list[str]] = None  # trained in full and saved with the adapter (e.g. a head)
    calibration_batches: int = 4  # mask_type gradient/snip: training micro-batches scored to pick entries


@dataclass
class LoraSection:
    """adapter: lora | dora only (PEFT's LoraConfig). Targets, modules_to_save and the budget come from
    ``shira:``, so an A/B changes one key (training/lora_baseline.py)."""

    r: Optional[int] = None  # None: shira.r, the equal budget (rank r's A and B hold r*(in+out) entries)
    alpha: Optional[float] = None  # lora_alpha; None: 2*r, as PEFT's own LoRA baselines (r=32, alpha=64)
    dropout: float = 0.0  # lora_dropout on the adapter's input, in [0, 1)


@dataclass
class TrainingConfig:
    seed: int = 0  # model init (inline configs, new heads), data order
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 8  # examples per forward, per process
    gradient_accumulation_steps: int = 1  # global batch = micro_batch_size * this * world size
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup, decays to min_lr_ratio*lr
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    # A step whose loss or gradient norm (both reduced over ranks, so every rank decides alike) is
    # not finite takes no optimizer update. 0: the run stops there (status failed, exit 1); N: up to
    # N such steps in a row are skipped (their batch and LR-schedule slot are used up), the N+1st
    # stops the run. DeepSpeed clips and steps inside its engine, so it always stops at the first.
    max_nonfinite_steps: int = 0
    precision: Precision = "auto"  # auto: bf16 autocast where fast (CUDA, CPU with AMX), else fp32
    eval_every: int = 0  # steps between evaluations (0: only before and after training)
    eval_before_training: bool = True  # score the untrained model first
    eval_batch_size: Optional[int] = None  # None: 2 * micro_batch_size
    log_every: int = 10  # steps between log lines and tracker points
    save_every: int = 0  # steps between checkpoints (0: only the final one)
    keep_checkpoints: Optional[int] = None  # keep the newest N step-* checkpoints (None: all)
    # auto: from the newest checkpoint in output_dir that loads completely (broken ones are skipped, named);
    # a completed run there (metrics.json "completed" + final/) is an error, not a new run.
    # never: start over (earlier checkpoints, final/ and metrics.json are removed).
    # A checkpoint path (checkpoints/step-<N>): continue from it, e.g. a completed run with a higher max_steps.
    resume: str = "auto"
    stop_after_step: Optional[int] = None  # end this process at that step with a checkpoint (time-sliced jobs);
    # the schedule still spans max_steps, and a later run resumes from there
    progress_bar: bool = True  # tqdm on rank 0
    # torch threads per process: an int; "auto": one per idle core (cores minus the 1-minute load
    # average, at least 1: on a shared machine extra threads wait on each other); None: torch's default
    num_threads: Union[int, Literal["auto"], None] = None
    # Activation checkpointing (HF TrainingArguments' name): each decoder layer keeps only its input in
    # forward and recomputes the rest in backward (less memory, ~one more forward of compute); same
    # losses and gradients. Under every strategy (strategies/common.py: enable_gradient_checkpointing).
    gradient_checkpointing: bool = False


@dataclass
class FsdpOptions:
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward
    cpu_offload: bool = False


@dataclass
class DistributedConfig:
    strategy: Strategy = "single"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    # How long a rank waits in a collective for its peers before the job fails: at start-up
    # (rendezvous, local rank 0 filling the data cache), at every step, around checkpoints. A hung
    # or dead peer costs this long. Raise it when local rank 0's first tokenization of a large data
    # set, or rank 0 writing a checkpoint, can take longer.
    timeout_minutes: int = 5
    zero_stage: Optional[Literal[0, 1, 2, 3]] = None  # deepspeed: overrides the JSON's zero_optimization.stage
    deepspeed_config: Optional[str] = None  # deepspeed: a JSON config, e.g. configs/deepspeed/zero3.json
    # deepspeed ZeRO-3: build the base model already partitioned (deepspeed.zero.Init through
    # transformers' HfDeepSpeedConfig), so no rank ever holds the whole model. auto: on for ZeRO-3
    # with weights from model.path/builtin, unless the mask is data-driven (gradient/snip score the
    # whole model before sharding); a random-init inline_config is built whole (same draws everywhere)
    zero_init: Union[bool, Literal["auto"]] = "auto"
    fsdp: FsdpOptions = field(default_factory=FsdpOptions)


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "shira-dist"
    run_name: Optional[str] = None  # None: the output_dir's name
    mode: Literal["auto", "offline", "online"] = "auto"  # auto: online only if WANDB_API_KEY is set
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # resolved config, checkpoints, final adapter, metrics, wandb
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    shira: ShiraSection = field(default_factory=ShiraSection)
    # shira: SHiRA (this project); lora / dora: PEFT's LoRA / DoRA (LoraConfig(use_dora=True), which adds a
    # magnitude vector of `out` entries per layer) on shira.target_modules at rank lora.r (default shira.r:
    # the same trainable count as SHiRA's mask); shira.mask_type must stay random; strategies single and ddp
    adapter: Literal["shira", "lora", "dora"] = "shira"
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # "none" is short for {backend: none}
