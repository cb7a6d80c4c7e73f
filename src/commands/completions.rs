//! `dltool completions SHELL`: a completion script generated from the command-line definition.

use super::Status;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Install, for example: `dltool completions bash > ~/.local/share/bash-completion/completions/dltool`, \
`dltool completions zsh > ~/.zfunc/_dltool` (with ~/.zfunc in $fpath), \
`dltool completions fish > ~/.config/fish/completions/dltool.fish`, or \
`dltool completions powershell >> $PROFILE`.")]
pub struct Args {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

/// Writes the script for `cli` (the whole `dltool` command) to stdout.
pub fn run(args: Args, mut cli: clap::Command) -> anyhow::Result<Status> {
    let name = cli.get_name().to_string();
    // clap_complete panics when its writer fails: generate into memory, then write with errors
    // returned (a closed pipe or a full disk is then handled like every other command's output).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cli, name, &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
    Ok(Status::Ok)
}
