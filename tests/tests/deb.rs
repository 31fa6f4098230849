//! The Debian package `cargo xtask deb` builds (and `cargo xtask test`
//! builds before the tests run): what it installs where, that the example
//! config is a conffile and passes `balancer check`, that installing it
//! neither enables nor starts the agent, and what lintian says.
//!
//! Needs dpkg-deb and lintian (scripts/setup.sh installs lintian).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};
use balancer_tests::lab::workspace_dir;

/// The one `balancer_*.deb` under target/debian/.
fn package() -> Result<PathBuf> {
    let dir = workspace_dir().join("target/debian");
    let found: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("read {} (run `cargo xtask deb` first)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("balancer_") && n.ends_with(".deb"))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no balancer_*.deb in {} (run `cargo xtask deb`)",
            dir.display()
        ),
        many => bail!("several packages in {}: {many:?}", dir.display()),
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("spawn {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn dpkg_deb(args: &[&str], deb: &Path) -> Result<String> {
    output(Command::new("dpkg-deb").args(args).arg(deb))
}

/// One file of the package's control archive (`dpkg-deb --info DEB FILE`).
fn control_file(deb: &Path, name: &str) -> Result<String> {
    output(Command::new("dpkg-deb").arg("--info").arg(deb).arg(name))
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn package_installs_binary_unit_config_and_completions() -> Result<()> {
    let deb = package()?;
    let listing = dpkg_deb(&["-c"], &deb)?;
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for want in [
        "./usr/sbin/balancer",
        "./usr/lib/systemd/system/balancer.service",
        "./etc/balancer/balancer.toml",
        "./usr/share/bash-completion/completions/balancer",
        "./usr/share/zsh/vendor-completions/_balancer",
        "./usr/share/fish/vendor_completions.d/balancer.fish",
    ] {
        ensure!(
            paths.contains(&want),
            "{} lacks {want}:\n{listing}",
            deb.display()
        );
    }
    let binary = listing
        .lines()
        .find(|l| l.ends_with(" ./usr/sbin/balancer"))
        .context("binary line")?;
    ensure!(binary.starts_with("-rwxr-xr-x"), "binary mode: {binary}");

    let control = dpkg_deb(&["-f"], &deb)?;
    for field in ["Package: balancer", "Section: net", "Depends: "] {
        ensure!(control.contains(field), "control lacks {field}:\n{control}");
    }
    let conffiles = control_file(&deb, "conffiles")?;
    ensure!(
        conffiles
            .lines()
            .any(|l| l == "/etc/balancer/balancer.toml"),
        "conffiles: {conffiles:?}"
    );
    Ok(())
}

#[test]
fn installed_files_work_together() -> Result<()> {
    let deb = package()?;
    let root = Scratch(std::env::temp_dir().join(format!("balancer-deb-{}", std::process::id())));
    let _ = fs::remove_dir_all(&root.0);
    fs::create_dir_all(&root.0)?;
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root.0))?;

    // The unit runs the installed binary on the installed config.
    let unit = fs::read_to_string(root.0.join("usr/lib/systemd/system/balancer.service"))?;
    let shipped = fs::read_to_string(workspace_dir().join("scripts/balancer.service"))?;
    ensure!(
        unit == shipped,
        "the packaged unit differs from scripts/balancer.service"
    );
    ensure!(unit.contains("ExecStart=/usr/sbin/balancer run --config /etc/balancer/balancer.toml"));

    let bin = root.0.join("usr/sbin/balancer");
    let version = output(Command::new(&bin).arg("--version"))?;
    let control = dpkg_deb(&["-f"], &deb)?;
    let package_version = control
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .context("Version field")?;
    let upstream = package_version
        .rsplit_once('-')
        .map_or(package_version, |(upstream, _revision)| upstream);
    ensure!(
        version.trim() == format!("balancer {upstream}"),
        "binary says {version:?}, package {package_version}"
    );
    // dpkg shows the changelog's newest entry: it must be this version.
    let changelog = fs::read_to_string(workspace_dir().join("scripts/debian/changelog"))?;
    ensure!(
        changelog.starts_with(&format!("balancer ({package_version})")),
        "scripts/debian/changelog's first entry is not {package_version}"
    );
    let config = root.0.join("etc/balancer/balancer.toml");
    let check = output(Command::new(&bin).arg("check").arg("--config").arg(&config))?;
    ensure!(check.contains("valid"), "balancer check: {check}");

    let bash = fs::read_to_string(
        root.0
            .join("usr/share/bash-completion/completions/balancer"),
    )?;
    for word in ["status", "check", "run"] {
        ensure!(bash.contains(word), "bash completion lacks {word}");
    }

    // Installing must not start an agent on an unedited example config.
    let postinst = control_file(&deb, "postinst")?;
    ensure!(
        !postinst.contains("deb-systemd-invoke start")
            && !postinst.contains("systemctl --system enable"),
        "postinst enables or starts the unit:\n{postinst}"
    );
    ensure!(postinst.contains("daemon-reload"), "postinst:\n{postinst}");
    Ok(())
}

#[test]
fn lintian_reports_no_errors() -> Result<()> {
    let deb = package()?;
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .context("run lintian (scripts/setup.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    // Warnings are shown, not judged (no manual page yet).
    eprintln!("{text}");
    ensure!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    Ok(())
}

/// The README's configuration block is the example the package installs,
/// below the example's header comment.
#[test]
fn example_config_is_the_readmes() -> Result<()> {
    let readme = fs::read_to_string(workspace_dir().join("README.md"))?;
    let section = readme
        .split_once("### Configuration")
        .context("README lacks its Configuration section")?
        .1;
    let block = section
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .context("no toml block in README's Configuration section")?
        .0;
    let example = fs::read_to_string(workspace_dir().join("scripts/balancer.toml"))?;
    let body: String = example
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    ensure!(
        body == block,
        "scripts/balancer.toml (below its header) differs from README's Configuration block"
    );
    Ok(())
}
