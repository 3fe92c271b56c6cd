//! `tilectl`, the TileFlow admin CLI.
//!
//! Offline commands (no daemon needed): `model import|synth|list|show|rm`, `run`, `demo`.

mod cli;
mod model;
mod output;
mod run;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, ModelCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TILEFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(tileflow_engine::store::default_state_dir);
    let result = match cli.command {
        Command::Model { command } => match command {
            ModelCommand::Import(args) => model::import(&state_dir, args),
            ModelCommand::Synth(args) => model::synth(&state_dir, args),
            ModelCommand::List { json } => model::list(&state_dir, json),
            ModelCommand::Show { name, json } => model::show(&state_dir, &name, json),
            ModelCommand::Rm { names } => model::rm(&state_dir, &names),
        },
        Command::Run(args) => run::run(&state_dir, args),
        Command::Demo(args) => run::demo(&state_dir, args),
        Command::Completions { shell } => cli::completions(shell),
        Command::Man { dir } => cli::man(&dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tilectl: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
