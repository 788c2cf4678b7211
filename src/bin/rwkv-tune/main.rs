//! `rwkv-tune`: the command-line tool. Thin: parse arguments, call the
//! library, print. One file per subcommand.
mod bench;
mod compare;
mod convert;
mod eval;
mod generate;
mod interrupt;
mod merge;
mod reduce;
mod reduce_bench;
mod tune;
mod wkv7;

use clap::{Parser, Subcommand};

/// RWKV-7 ("Goose", x070) kernels, models and state tuning, without Python.
#[derive(Parser)]
#[command(name = "rwkv-tune", version, about, long_about = None)]
struct Cli {
    /// Let NaN / Inf through: by default a model, state, checkpoint or
    /// kernel input holding one is refused, and so is a tuned state that
    /// would be written with one.
    #[arg(long, global = true)]
    allow_nonfinite: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the WKV-7 kernels on tensors from a safetensors file (forward, and
    /// backward when `dy` is present) and write the results to another file.
    Wkv7(wkv7::Wkv7Args),
    /// Generate text from a model (optionally starting from a tuned state).
    Generate(generate::GenerateArgs),
    /// Evaluate a model on a dataset: loss, bits per byte, perplexity,
    /// LAMBADA-style last-word accuracy.
    Eval(eval::EvalArgs),
    /// Benchmark the WKV-7 kernels over a table of shapes (GPU when present,
    /// else the CPU paths) and write JSON.
    Bench(bench::BenchArgs),
    /// Tune a frozen model: its initial recurrent state per layer (default)
    /// or LoRA adapters (`--method lora`); try `rwkv-tune tune --demo`.
    Tune(Box<tune::TuneArgs>),
    /// Compare plain / DBP / kernel-upscaled / observer state tuning on one
    /// task at the same budget and write a markdown table.
    Compare(compare::CompareArgs),
    /// Merge a LoRA adapter into its base model and write a plain model
    /// (official x070 names) that any RWKV-7 runtime loads.
    Merge(merge::MergeArgs),
    /// Convert models and states between safetensors and PyTorch `.pth`
    /// (tensors bit-identical when the dtype is kept), or a state to the
    /// RWKV-PEFT layout.
    Convert(convert::ConvertArgs),
    /// Token reduction of the prefill: quality, prefill time and counted
    /// FLOPs saved for several ratios and methods on LAMBADA, tiny-shakespeare
    /// and GSM8K; writes a markdown table.
    ReduceBench(reduce_bench::ReduceBenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    rwkv_tune::guard::set_allow_nonfinite(cli.allow_nonfinite);
    match cli.cmd {
        Cmd::Wkv7(a) => wkv7::run(a),
        Cmd::Generate(a) => generate::run(a),
        Cmd::Eval(a) => eval::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Tune(a) => tune::run(*a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Merge(a) => merge::run(a),
        Cmd::ReduceBench(a) => reduce_bench::run(a),
    }
}
