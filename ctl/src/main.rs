//! `tilectl`, the TileFlow admin CLI.
//!
//! A thin client of `tileflowd` (`status`, `ps`, `metrics`, `model …`, `run`), with offline
//! forms of the model commands and `run` that act on the store directly (`--offline`,
//! `--state-dir`), a `demo` that starts its own daemon, and `bench`, which measures the machine.

mod bench_cpu;
mod bench_io;
mod bench_stream;
mod chat;
mod cli;
mod demo;
mod device;
mod metrics;
mod model;
mod output;
mod remote;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use tileflow_client::ClientError;

use crate::cli::{BenchCommand, Cli, Command, ModelCommand};

/// Where a command acts: the rule of "Where commands act" in `--help`.
#[derive(Debug)]
enum Place {
    /// Through the daemon on this socket.
    Daemon(PathBuf),
    /// On the store in this state directory.
    Store(PathBuf),
}

impl Place {
    fn of(cli: &Cli) -> Place {
        if cli.offline || cli.state_dir.is_some() {
            Place::Store(store_dir(cli))
        } else {
            Place::Daemon(cli.socket.clone())
        }
    }
}

/// The store of offline commands: `--state-dir`, else `TILEFLOW_STATE_DIR`, else the default.
fn store_dir(cli: &Cli) -> PathBuf {
    cli.state_dir
        .clone()
        .or_else(|| {
            std::env::var_os("TILEFLOW_STATE_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(tileflow_engine::store::default_state_dir)
}

fn daemon_only(place: Place, what: &str) -> anyhow::Result<PathBuf> {
    match place {
        Place::Daemon(socket) => Ok(socket),
        Place::Store(_) => bail!(
            "`tilectl {what}` asks the daemon; it has no offline form (drop --offline / --state-dir)"
        ),
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let place = Place::of(&cli);
    let store = store_dir(&cli);
    match cli.command {
        Command::Status { json } => remote::status(&daemon_only(place, "status")?, json),
        Command::Ps { json } => remote::ps(&daemon_only(place, "ps")?, json),
        Command::Metrics { json, raw } => metrics::show(&daemon_only(place, "metrics")?, json, raw),
        Command::Model { command } => match (command, place) {
            (ModelCommand::Synth(args), _) => model::synth(&store, args),
            (ModelCommand::Import(args), Place::Store(dir)) => model::import(&dir, args),
            (ModelCommand::Import(args), Place::Daemon(s)) => remote::import(&s, args),
            (ModelCommand::List { json }, Place::Store(dir)) => model::list(&dir, json),
            (ModelCommand::List { json }, Place::Daemon(s)) => remote::list(&s, json),
            (ModelCommand::Show { name, json }, Place::Store(dir)) => {
                model::show(&dir, &name, json)
            }
            (ModelCommand::Show { name, json }, Place::Daemon(s)) => remote::show(&s, &name, json),
            (ModelCommand::Rm { names }, Place::Store(dir)) => model::rm(&dir, &names),
            (ModelCommand::Rm { names }, Place::Daemon(s)) => remote::rm(&s, &names),
            (ModelCommand::Load { names }, place) => {
                remote::load(&daemon_only(place, "model load")?, &names)
            }
            (ModelCommand::Unload { names }, place) => {
                remote::unload(&daemon_only(place, "model unload")?, &names)
            }
        },
        Command::Run(args) => match place {
            Place::Store(dir) => run::run(&dir, args),
            Place::Daemon(s) => chat::run(&s, args),
        },
        Command::Demo(args) => match place {
            Place::Store(dir) => run::demo(&dir, args),
            Place::Daemon(_) => demo::demo(args),
        },
        Command::Bench { command } => match command {
            BenchCommand::Stream(args) => bench_stream::run(&store, args),
            BenchCommand::Io(args) => bench_io::run(&store, args),
        },
        Command::Completions { shell } => cli::completions(shell),
        Command::Man { dir } => cli::man(&dir),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TILEFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tilectl: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if e.chain().any(|c| {
                c.downcast_ref::<ClientError>()
                    .is_some_and(ClientError::is_connect)
            }) {
                eprintln!(
                    "tilectl: hint: start it (systemctl start tileflowd), point --socket or \
                     TILEFLOW_SOCKET at it, or use --offline for the model store"
                );
            }
            ExitCode::FAILURE
        }
    }
}
