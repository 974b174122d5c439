//! Builds the whole service from [`Settings`] and a bound listener (port 0 in tests).

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{middleware, web, App, HttpServer};

use crate::db::{Db, DbError};
use crate::http::{self, AppState};
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Application {
    port: u16,
    server: Server,
    db: Db,
}

impl Application {
    /// Connects to the database, applies pending migrations and binds the HTTP server.
    pub async fn build(settings: Settings, listener: TcpListener) -> Result<Self, StartupError> {
        let settings = Arc::new(settings);
        let db = {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || -> Result<Db, DbError> {
                let db = Db::connect(&settings.database_url, settings.db_pool_size)?;
                for version in db.migrate()? {
                    log::info!("applied migration {version}");
                }
                Ok(db)
            })
            .await
            .map_err(|e| DbError::Unavailable(e.to_string()))??
        };
        let port = listener.local_addr()?.port();
        let state = web::Data::new(AppState::new(db.clone(), settings.clone()));
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(middleware::Logger::new("%s %r %Dms").exclude("/healthz"))
                .app_data(state.clone())
                .configure(http::config)
        })
        .listen(listener)?;
        if settings.http_workers > 0 {
            server = server.workers(settings.http_workers);
        }
        Ok(Application {
            port,
            server: server.run(),
            db,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Serves until SIGINT/SIGTERM (actix finishes in-flight requests first).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
