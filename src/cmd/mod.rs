//! One module per subcommand: its arguments and its `run`.

pub mod bench;
pub mod bench_comm;
pub mod bench_eval;
pub mod bench_ops;
pub mod bench_step;
pub mod convert;
pub mod embed;
pub mod eval;
pub mod launch;
pub mod output;
pub mod plot;
pub mod pretrain;
pub mod shards_inspect;
pub mod shards_synth;
pub mod shards_write;
pub mod tokenizer;
pub mod world;
