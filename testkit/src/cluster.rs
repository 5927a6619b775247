//! A throwaway PostgreSQL cluster for tests and the demo: `initdb` + `pg_ctl` on a free TCP port
//! in a temporary directory, removed on drop.
//!
//! The cluster trusts every local connection, listens on `127.0.0.1` only, keeps its unix socket
//! inside its own directory and runs with `fsync=off` (it holds nothing worth keeping). When the
//! process runs as root, PostgreSQL refuses to start as root, so the directory is handed to the
//! `postgres` OS user and every server command runs as that user (`runuser`, or `su` if missing).
//!
//! ```no_run
//! # fn main() -> Result<(), pgiplock_testkit::cluster::ClusterError> {
//! let cluster = pgiplock_testkit::cluster::TempCluster::start()?;
//! println!("connect to {}", cluster.url());
//! cluster.restart()?; // same port, fast shutdown
//! drop(cluster); // stops the server and deletes its directory
//! # Ok(())
//! # }
//! ```

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The OS user that owns the cluster when we run as root.
const SERVER_USER: &str = "postgres";
/// Upper bound, in seconds, of every `pg_ctl` wait.
const PG_CTL_WAIT_SECS: &str = "30";
/// How many free ports to try when another process grabs the one we picked first.
const START_ATTEMPTS: usize = 3;
/// Environment variable naming a directory with `initdb` and `pg_ctl`, tried before anything else.
pub const BIN_DIR_ENV: &str = "PGIPLOCK_PG_BIN";

/// Why a [`TempCluster`] could not be started or controlled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No directory with both `initdb` and `pg_ctl` was found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in ${BIN_DIR_ENV}, PATH or /usr/lib/postgresql/*/bin; \
         install them, e.g. `apt-get install postgresql`"
    )]
    BinariesNotFound,
    /// A filesystem or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A server command ran but failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command, for the message.
        command: String,
        /// Its exit status.
        status: String,
        /// Its output and the tail of the server log.
        output: String,
    },
}

impl ClusterError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How server commands are run: directly, or as the `postgres` user when we are root.
#[derive(Debug, Clone)]
enum RunAs {
    /// We are not root: run as ourselves.
    Myself,
    /// `runuser -u postgres -- cmd args...`
    Runuser(PathBuf),
    /// `su postgres -c 'cmd args...'`
    Su(PathBuf),
}

/// A throwaway PostgreSQL cluster: started by [`TempCluster::start`], stopped and deleted on drop.
#[derive(Debug)]
pub struct TempCluster {
    /// Owns the directory; declared after nothing that needs it, and removed after the server
    /// stops (see `Drop`).
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    run_as: RunAs,
}

impl TempCluster {
    /// Creates, configures and starts a new cluster on a free port on `127.0.0.1`.
    ///
    /// Binaries are looked up in `$PGIPLOCK_PG_BIN`, then `PATH`, then the highest version under
    /// `/usr/lib/postgresql/*/bin`. Every wait is bounded (30 s).
    pub fn start() -> Result<TempCluster, ClusterError> {
        Self::start_as(run_as()?)
    }

    fn start_as(run_as: RunAs) -> Result<TempCluster, ClusterError> {
        let mut cluster = Self::create(run_as)?;
        cluster.initdb()?;
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    /// A cluster directory with nothing in it yet (no data directory, no server).
    pub(crate) fn create_empty() -> Result<TempCluster, ClusterError> {
        Self::create(run_as()?)
    }

    fn create(run_as: RunAs) -> Result<TempCluster, ClusterError> {
        let bin_dir = find_bin_dir().ok_or(ClusterError::BinariesNotFound)?;
        let dir = tempfile::Builder::new()
            .prefix("pgiplock-cluster-")
            .tempdir()
            .map_err(|e| ClusterError::io("creating a temporary directory", e))?;
        if !matches!(run_as, RunAs::Myself) {
            chown_to_server_user(dir.path())?;
        }
        let data_dir = dir.path().join("data");
        let log_file = dir.path().join("server.log");
        Ok(TempCluster {
            dir,
            data_dir,
            log_file,
            bin_dir,
            port: 0,
            run_as,
        })
    }

    /// Picks a free port, appends our settings and starts the server, retrying on another port
    /// when the first was taken meanwhile.
    pub(crate) fn start_on_free_port(&mut self) -> Result<(), ClusterError> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            self.write_config()?;
            match self.pg_ctl(&["start"]) {
                Ok(()) => return Ok(()),
                // Most likely someone took the port between our probe and the server's bind.
                Err(_) if attempt < START_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs one of the server binaries (`pg_basebackup`, `psql`, ...) as the server user and
    /// returns its standard output.
    pub(crate) fn run_tool(&self, program: &str, args: &[OsString]) -> Result<String, ClusterError> {
        let binary = self.tool(program);
        let described = format!(
            "{} {}",
            binary.display(),
            args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
        let output = self
            .command(&binary, args)
            .output()
            .map_err(|e| ClusterError::io(format!("running {described}"), e))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        Err(ClusterError::Command {
            command: described,
            status: output.status.to_string(),
            output: self.failure_text(&output),
        })
    }

    /// Where `program` is: beside `initdb`, or else beside the file `pg_ctl` links to (a
    /// `PATH` directory may link only the two binaries we look for).
    fn tool(&self, program: &str) -> PathBuf {
        let beside = self.bin_dir.join(program);
        if beside.is_file() {
            return beside;
        }
        std::fs::canonicalize(self.bin_dir.join("pg_ctl"))
            .ok()
            .and_then(|pg_ctl| pg_ctl.parent().map(|dir| dir.join(program)))
            .filter(|linked| linked.is_file())
            .unwrap_or(beside)
    }

    /// Runs `pg_ctl` with `action` (for example `["promote"]`), waiting up to 30 s.
    pub(crate) fn control(&self, action: &[&str]) -> Result<(), ClusterError> {
        self.pg_ctl(action)
    }

    /// The TCP port the server listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for the `postgres` user and database.
    pub fn url(&self) -> String {
        format!("postgres://{SERVER_USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// A connection config for the `postgres` user and database.
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(SERVER_USER)
            .dbname("postgres");
        config
    }

    /// The cluster's directory (data directory, unix socket and server log live inside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Restarts the server with a fast shutdown (clients are disconnected), on the same port.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["restart", "-m", "fast"])
    }

    /// Stops the server with a fast shutdown; [`start_again`](Self::start_again) brings it back.
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["stop", "-m", "fast"])
    }

    /// Starts a stopped server again, on the same port.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["start"])
    }

    /// Crashes the server: an immediate shutdown, as a power cut would (no checkpoint; clients
    /// see their connections end). [`start_again`](Self::start_again) runs crash recovery.
    pub fn crash(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["stop", "-m", "immediate"])
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        let mut args: Vec<OsString> = vec!["-D".into(), self.data_dir.clone().into()];
        for arg in [
            "-U",
            SERVER_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ] {
            args.push(arg.into());
        }
        self.run_server_command("initdb", &args)
    }

    /// Appends our settings; later lines win over initdb's defaults.
    fn write_config(&self) -> Result<(), ClusterError> {
        let mut settings = String::new();
        let socket_dir = self.dir.path().display().to_string().replace('\'', "''");
        // Writing to a String cannot fail.
        let _ = write!(
            settings,
            "\n# pgiplock TempCluster\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{socket_dir}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 200\n",
            self.port
        );
        let path = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| ClusterError::io(format!("opening {}", path.display()), e))?;
        file.write_all(settings.as_bytes())
            .map_err(|e| ClusterError::io(format!("writing {}", path.display()), e))
    }

    /// Runs `pg_ctl <action> -D data -l log -w -t 30`.
    fn pg_ctl(&self, action: &[&str]) -> Result<(), ClusterError> {
        let mut args: Vec<OsString> = action.iter().map(OsString::from).collect();
        args.extend([
            "-D".into(),
            self.data_dir.clone().into(),
            "-l".into(),
            self.log_file.clone().into(),
            "-w".into(),
            "-t".into(),
            PG_CTL_WAIT_SECS.into(),
        ]);
        self.run_server_command("pg_ctl", &args)
    }

    fn run_server_command(&self, program: &str, args: &[OsString]) -> Result<(), ClusterError> {
        self.run_tool(program, args).map(|_| ())
    }

    /// Builds the command line, wrapped to run as the server user when needed.
    fn command(&self, binary: &Path, args: &[OsString]) -> Command {
        let mut command = match &self.run_as {
            RunAs::Myself => {
                let mut command = Command::new(binary);
                command.args(args);
                command
            }
            RunAs::Runuser(runuser) => {
                let mut command = Command::new(runuser);
                command.args(["-u", SERVER_USER, "--"]).arg(binary).args(args);
                command
            }
            RunAs::Su(su) => {
                let mut line = shell_quote(&binary.to_string_lossy());
                for arg in args {
                    line.push(' ');
                    line.push_str(&shell_quote(&arg.to_string_lossy()));
                }
                let mut command = Command::new(su);
                command.args([SERVER_USER, "-c"]).arg(line);
                command
            }
        };
        // The server user may not be allowed into our working directory.
        command.current_dir(self.dir.path()).stdin(Stdio::null());
        command
    }

    fn failure_text(&self, output: &Output) -> String {
        let mut text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.trim().is_empty() {
            text.push('\n');
            text.push_str(stderr.trim());
        }
        if let Ok(log) = std::fs::read_to_string(&self.log_file) {
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            if !tail.is_empty() {
                text.push_str("\nserver log (last lines):\n");
                text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
        text
    }

    /// Last resort when `pg_ctl stop` failed: SIGKILL the postmaster named in `postmaster.pid`.
    fn kill_postmaster(&self) {
        let Ok(pid_file) = std::fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return;
        };
        let Some(pid) = pid_file.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        // Never panic here: every failure is ignored; the directory goes when `self.dir` drops.
        if !self.data_dir.join("postmaster.pid").exists() {
            return;
        }
        let args: Vec<OsString> = [
            "stop",
            "-m",
            "immediate",
            "-D",
            &self.data_dir.to_string_lossy(),
            "-w",
            "-t",
            "10",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let stopped = self
            .command(&self.bin_dir.join("pg_ctl"), &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !stopped {
            self.kill_postmaster();
        }
    }
}

/// Finds a directory holding both `initdb` and `pg_ctl`.
fn find_bin_dir() -> Option<PathBuf> {
    let has_binaries = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).map(PathBuf::from) {
        if has_binaries(&dir) {
            return Some(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| has_binaries(dir)) {
            return Some(dir);
        }
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    versions
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = version_key(&entry.file_name().to_string_lossy())?;
            let bin = entry.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// `"15"` → `[15]`, `"9.6"` → `[9, 6]`; anything else is not a version directory.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Decides how to run server commands; PostgreSQL refuses to run as root.
fn run_as() -> Result<RunAs, ClusterError> {
    // The owner of /proc/self is the effective uid, without unsafe code.
    let euid = std::fs::metadata("/proc/self")
        .map_err(|e| ClusterError::io("reading /proc/self to learn the effective user", e))?
        .uid();
    if euid != 0 {
        return Ok(RunAs::Myself);
    }
    if let Some(runuser) = find_in_path("runuser") {
        return Ok(RunAs::Runuser(runuser));
    }
    if let Some(su) = find_in_path("su") {
        return Ok(RunAs::Su(su));
    }
    Err(ClusterError::io(
        "running as root needs `runuser` or `su` to start PostgreSQL as the postgres user",
        std::io::Error::from(std::io::ErrorKind::NotFound),
    ))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn chown_to_server_user(dir: &Path) -> Result<(), ClusterError> {
    let uid = id_of("-u")?;
    let gid = id_of("-g")?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .map_err(|e| ClusterError::io(format!("chown {} to {SERVER_USER}", dir.display()), e))
}

/// `id -u postgres` / `id -g postgres`: goes through NSS like the server's own tools do.
fn id_of(flag: &str) -> Result<u32, ClusterError> {
    let output = Command::new("id")
        .args([flag, SERVER_USER])
        .output()
        .map_err(|e| ClusterError::io(format!("running id {flag} {SERVER_USER}"), e))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.trim().parse() {
        Ok(id) if output.status.success() => Ok(id),
        _ => Err(ClusterError::Command {
            command: format!("id {flag} {SERVER_USER}"),
            status: output.status.to_string(),
            output: format!(
                "{}; running as root needs a `{SERVER_USER}` OS user (it comes with the postgresql package)",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }),
    }
}

/// Asks the kernel for a free port; the server binds it a moment later.
fn free_port() -> Result<u16, ClusterError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError::io("binding 127.0.0.1:0 to find a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| ClusterError::io("reading the probe socket's port", e))?
        .port();
    Ok(port)
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts a cluster, or prints why the test is skipped when no binaries are installed.
    fn start_or_skip() -> Option<TempCluster> {
        match TempCluster::start() {
            Ok(cluster) => Some(cluster),
            Err(ClusterError::BinariesNotFound) => {
                eprintln!("skipped: {}", ClusterError::BinariesNotFound);
                None
            }
            Err(e) => panic!("starting a TempCluster: {e}"),
        }
    }

    async fn select_one(config: &tokio_postgres::Config) -> Result<i32, tokio_postgres::Error> {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let task = tokio::spawn(connection);
        let value: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
        drop(client);
        let _ = task.await;
        Ok(value)
    }

    #[test]
    fn version_directories_sort_numerically() {
        assert_eq!(version_key("15"), Some(vec![15]));
        assert_eq!(version_key("9.6"), Some(vec![9, 6]));
        assert_eq!(version_key("main"), None);
        assert!(version_key("10") > version_key("9.6"));
    }

    #[test]
    fn missing_binaries_name_the_package() {
        let text = ClusterError::BinariesNotFound.to_string();
        assert!(text.contains("$PGIPLOCK_PG_BIN"), "{text}");
        assert!(text.contains("apt-get install postgresql"), "{text}");
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn start_connect_restart_stop_and_drop_cleans_up() {
        let Some(cluster) = start_or_skip() else { return };
        assert!(cluster.url().ends_with(&format!(":{}/postgres", cluster.port())));
        assert_eq!(select_one(&cluster.config()).await.expect("connect"), 1);

        // A connection open across a restart is cut; a new one works on the same port.
        let (client, connection) = cluster.config().connect(tokio_postgres::NoTls).await.expect("connect");
        let task = tokio::spawn(connection);
        let port = cluster.port();
        tokio::task::block_in_place(|| cluster.restart()).expect("restart");
        assert!(
            client.query_one("SELECT 1", &[]).await.is_err(),
            "old session survived a restart"
        );
        let _ = task.await;
        assert_eq!(cluster.port(), port);
        assert_eq!(select_one(&cluster.config()).await.expect("reconnect"), 1);

        tokio::task::block_in_place(|| cluster.stop()).expect("stop");
        assert!(
            select_one(&cluster.config()).await.is_err(),
            "server still answers after stop"
        );
        tokio::task::block_in_place(|| cluster.start_again()).expect("start again");
        assert_eq!(
            select_one(&cluster.config()).await.expect("connect after start_again"),
            1
        );

        let dir = cluster.dir().to_path_buf();
        tokio::task::block_in_place(|| drop(cluster));
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(
            select_one(&config_for_port(port)).await.is_err(),
            "server still answers after drop"
        );
    }

    #[test]
    fn su_works_where_runuser_is_missing() {
        let (Ok(RunAs::Runuser(_)), Some(su)) = (run_as(), find_in_path("su")) else {
            eprintln!("skipped: not root, or no su");
            return;
        };
        let cluster = match TempCluster::start_as(RunAs::Su(su)) {
            Ok(cluster) => cluster,
            Err(ClusterError::BinariesNotFound) => return eprintln!("skipped: {}", ClusterError::BinariesNotFound),
            Err(e) => panic!("starting a TempCluster through su: {e}"),
        };
        cluster.restart().expect("restart through su");
        let dir = cluster.dir().to_path_buf();
        drop(cluster);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    fn config_for_port(port: u16) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(port).user(SERVER_USER).dbname("postgres");
        config
    }
}
