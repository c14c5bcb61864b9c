//! The `/api/v1/resources` collection: list (bounded pagination, `?fields=` selection), get,
//! create, replace, delete. Reads go to the read pool, writes to the write pool. It validates
//! every input before the database sees it, so bad input is a 4xx, never a 500. Authorisation of
//! writes is the gateway's job; the demo only records `X-Consumer-Id` as the owner.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::forwarded_consumer;
use crate::error::{check_text, json_object, ApiError};
use crate::state::AppState;

pub const DEFAULT_PER_PAGE: u32 = 20;
pub const MAX_PER_PAGE: u32 = 100;
/// Deep offsets are slow and pointless in a demo; this also keeps `OFFSET` far from overflow.
pub const MAX_PAGE: u32 = 10_000;
/// The JSON names `?fields=` may select, in output order.
pub const FIELDS: [&str; 6] = [
    "id",
    "name",
    "description",
    "owner",
    "createdAt",
    "updatedAt",
];

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    id: i64,
    name: String,
    description: Option<String>,
    owner: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, name, description, owner, created_at, updated_at";

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    page: Option<u32>,
    per_page: Option<u32>,
    fields: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct GetQuery {
    fields: Option<String>,
}

/// The body of POST and PUT (PUT replaces the whole resource).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceInput {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

impl ResourceInput {
    fn validate(&self) -> Result<(), ApiError> {
        check_text("name", &self.name, 200)?;
        if self.name.trim().is_empty() {
            return Err(ApiError::invalid("name must not be empty"));
        }
        if let Some(d) = &self.description {
            check_text("description", d, 2000)?;
        }
        Ok(())
    }
}

/// Parse `?fields=a,b`: `None` selects everything; an empty list or unknown name is a 400.
pub fn parse_fields(raw: Option<&str>) -> Result<Option<Vec<&'static str>>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    let mut selected = Vec::new();
    for name in raw.split(',').map(str::trim) {
        let Some(known) = FIELDS.iter().find(|f| **f == name) else {
            return Err(ApiError::bad_request(
                "unknown_field",
                format!(
                    "unknown field {name:?} in fields; known: {}",
                    FIELDS.join(",")
                ),
            ));
        };
        if !selected.contains(known) {
            selected.push(*known);
        }
    }
    Ok(Some(selected))
}

/// Validate `page`/`per_page` against their bounds (1-based pages).
pub fn page_bounds(page: Option<u32>, per_page: Option<u32>) -> Result<(u32, u32), ApiError> {
    let page = page.unwrap_or(1);
    let per_page = per_page.unwrap_or(DEFAULT_PER_PAGE);
    if !(1..=MAX_PAGE).contains(&page) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("page must be between 1 and {MAX_PAGE}"),
        ));
    }
    if !(1..=MAX_PER_PAGE).contains(&per_page) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("per_page must be between 1 and {MAX_PER_PAGE}"),
        ));
    }
    Ok((page, per_page))
}

fn project(r: &Resource, fields: Option<&[&'static str]>) -> Result<Value, ApiError> {
    let Value::Object(full) =
        serde_json::to_value(r).map_err(|e| ApiError::Internal(e.to_string()))?
    else {
        return Err(ApiError::Internal("resource is not an object".into()));
    };
    let Some(fields) = fields else {
        return Ok(Value::Object(full));
    };
    let mut out = Map::new();
    for f in fields {
        if let Some(v) = full.get(*f) {
            out.insert((*f).to_string(), v.clone());
        }
    }
    Ok(Value::Object(out))
}

fn missing(id: i64) -> ApiError {
    ApiError::not_found(format!("resource {id} not found"))
}

/// `GET /api/v1/resources?page=&per_page=&fields=`.
pub async fn list(
    State(st): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let (page, per_page) = page_bounds(q.page, q.per_page)?;
    let fields = parse_fields(q.fields.as_deref())?;
    let offset = i64::from(page - 1) * i64::from(per_page);

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM resources")
        .fetch_one(&st.db.read)
        .await?;
    let rows: Vec<Resource> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM resources ORDER BY id LIMIT $1 OFFSET $2"
    ))
    .bind(i64::from(per_page))
    .bind(offset)
    .fetch_all(&st.db.read)
    .await?;
    let data = rows
        .iter()
        .map(|r| project(r, fields.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let per = i64::from(per_page);
    Ok(Json(json!({
        "data": data,
        "page": page,
        "perPage": per_page,
        "total": total,
        "totalPages": (total + per - 1) / per,
    })))
}

/// `GET /api/v1/resources/{id}?fields=`.
pub async fn get(
    State(st): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    let Query(q) = query?;
    let fields = parse_fields(q.fields.as_deref())?;
    let row: Option<Resource> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM resources WHERE id = $1"))
            .bind(id)
            .fetch_optional(&st.db.read)
            .await?;
    let row = row.ok_or_else(|| missing(id))?;
    Ok(Json(project(&row, fields.as_deref())?))
}

/// `POST /api/v1/resources` `{name, description?}` -> 201 with `Location`.
pub async fn create(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let input: ResourceInput = json_object(body)?;
    input.validate()?;
    let owner = forwarded_consumer(&headers)?;
    let row: Resource = sqlx::query_as(&format!(
        "INSERT INTO resources (name, description, owner) VALUES ($1, $2, $3) RETURNING {COLUMNS}"
    ))
    .bind(input.name.trim())
    .bind(&input.description)
    .bind(&owner)
    .fetch_one(&st.db.write)
    .await?;
    let location = format!("/api/v1/resources/{}", row.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(project(&row, None)?),
    )
        .into_response())
}

/// `PUT /api/v1/resources/{id}`: replace name and description; the owner is kept.
pub async fn replace(
    State(st): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    let input: ResourceInput = json_object(body)?;
    input.validate()?;
    let row: Option<Resource> = sqlx::query_as(&format!(
        "UPDATE resources SET name = $2, description = $3, updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(input.name.trim())
    .bind(&input.description)
    .fetch_optional(&st.db.write)
    .await?;
    let row = row.ok_or_else(|| missing(id))?;
    Ok(Json(project(&row, None)?))
}

/// `DELETE /api/v1/resources/{id}` -> 204, or 404 if it did not exist.
pub async fn delete(
    State(st): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id?;
    let done = sqlx::query("DELETE FROM resources WHERE id = $1")
        .bind(id)
        .execute(&st.db.write)
        .await?;
    if done.rows_affected() == 0 {
        return Err(missing(id));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_selection() {
        assert_eq!(parse_fields(None).unwrap(), None);
        assert_eq!(
            parse_fields(Some("id,name")).unwrap(),
            Some(vec!["id", "name"])
        );
        assert_eq!(
            parse_fields(Some(" name , id,name")).unwrap(),
            Some(vec!["name", "id"])
        );
        assert!(parse_fields(Some("id,password")).is_err());
        assert!(parse_fields(Some("")).is_err());
        assert!(parse_fields(Some("id,")).is_err());
    }

    #[test]
    fn pagination_bounds() {
        assert_eq!(page_bounds(None, None).unwrap(), (1, DEFAULT_PER_PAGE));
        assert_eq!(page_bounds(Some(3), Some(100)).unwrap(), (3, 100));
        assert!(page_bounds(Some(0), None).is_err());
        assert!(page_bounds(None, Some(0)).is_err());
        assert!(page_bounds(None, Some(MAX_PER_PAGE + 1)).is_err());
        assert!(page_bounds(Some(MAX_PAGE + 1), None).is_err());
    }

    #[test]
    fn input_validation() {
        let ok = ResourceInput {
            name: "widget".into(),
            description: None,
        };
        assert!(ok.validate().is_ok());
        for bad in ["", "   ", "a\0b"] {
            let input = ResourceInput {
                name: bad.into(),
                description: None,
            };
            assert!(input.validate().is_err(), "{bad:?}");
        }
        let long = ResourceInput {
            name: "x".repeat(201),
            description: None,
        };
        assert!(long.validate().is_err());
    }
}
