//! A real nginx for the proxy tests (tests/nginx.rs, tests/client_browser.rs): unprivileged
//! (no daemon, no master), in a temp dir, with a site file whose upstream and listen ports are
//! substituted; killed by its PID on drop, and restartable on the same port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{free_addr, wait_ready_unless};

pub const NGINX: &str = "/usr/sbin/nginx";

/// `deploy/nginx.conf`, the file tests run nginx with.
pub const SITE: &str = include_str!("../../deploy/nginx.conf");

pub struct Nginx {
    pub port: u16,
    child: Child,
    conf: PathBuf,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `site` (a site file like `deploy/nginx.conf`) proxying to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr, site: &str) -> Nginx {
        assert!(
            std::path::Path::new(NGINX).exists(),
            "{NGINX} is missing: run `bash .ci/run` or `apt-get install nginx`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_addr().port();
        let site = site
            .replace("127.0.0.1:7700", &upstream.to_string())
            .replace("listen 127.0.0.1:8080", &format!("listen 127.0.0.1:{port}"));
        assert!(site.contains(&upstream.to_string()) && site.contains(&port.to_string()));
        let d = dir.path().display();
        std::fs::write(dir.path().join("site.conf"), site).expect("site");
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             include {d}/site.conf;\n}}\n"
        );
        let conf: PathBuf = dir.path().join("nginx.conf");
        std::fs::write(&conf, main).expect("nginx.conf");
        let child = Self::spawn(&conf, dir.path());
        let mut nginx = Nginx {
            port,
            child,
            conf,
            dir,
        };
        nginx.wait_listening().await;
        nginx
    }

    fn spawn(conf: &std::path::Path, dir: &std::path::Path) -> Child {
        Command::new(NGINX)
            .arg("-c")
            .arg(conf)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nginx")
    }

    async fn wait_listening(&mut self) {
        let addr = format!("127.0.0.1:{}", self.port).parse().expect("addr");
        let child = &mut self.child;
        wait_ready_unless(addr, || {
            child
                .try_wait()
                .expect("wait")
                .map(|st| format!("nginx exited with {st}"))
        })
        .await
        .unwrap_or_else(|why| panic!("{why}"));
    }

    /// Kills nginx (every connection through it drops) and starts it again on the same port.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.conf, self.dir.path());
        self.wait_listening().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
