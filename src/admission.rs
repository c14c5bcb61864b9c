//! Admission plans: the checks a request passes after its head's own checks and before it may
//! go upstream, compiled once per route when a snapshot is built. What applies to a route is
//! decided here, once; a request walks its route's plan (see `proxy::admit`) and a route that
//! uses none of these features has an empty plan and pays nothing for it.
//!
//! The order of the steps is the order they run, and it matters:
//! 1. gateway shedding first: an overloaded gateway refuses before doing any work;
//! 2. authentication: a caller without credentials learns nothing about limits or backends;
//! 3. the rate limit, keyed by the identity just established;
//! 4. the declared body size (`Content-Length` against `max_body`);
//! 5. route shedding last: refused callers never hold one of the route's slots.

use std::sync::Arc;

use crate::route::Route;
use crate::shed::Shedder;

/// One admission step (see the module docs for their order).
#[derive(Debug, Clone)]
pub enum Step {
    /// Take a slot of the gateway's in-flight limit (`server.max_inflight`).
    ShedGateway(Arc<Shedder>),
    /// Establish the caller's identity and check the route's roles.
    Authenticate,
    /// Count the request against its tier's limit.
    RateLimit,
    /// Refuse a declared body larger than this many bytes.
    DeclaredSize(u64),
    /// Take a slot of the route's in-flight limit.
    ShedRoute(Arc<Shedder>),
}

/// A route's compiled admission steps, in running order.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    steps: Box<[Step]>,
}

impl Plan {
    /// The steps `route` needs, given the gateway's and the route's shedders (if configured).
    pub fn compile(
        route: &Route,
        gateway_shed: Option<&Arc<Shedder>>,
        route_shed: Option<&Arc<Shedder>>,
    ) -> Self {
        let mut steps = Vec::new();
        if let Some(s) = gateway_shed {
            steps.push(Step::ShedGateway(s.clone()));
        }
        if route.auth.mode != crate::identity::Mode::None || !route.auth.roles.is_empty() {
            steps.push(Step::Authenticate);
        }
        if route.limit.enabled {
            steps.push(Step::RateLimit);
        }
        if let Some(max) = route.max_body {
            steps.push(Step::DeclaredSize(max));
        }
        if let Some(s) = route_shed {
            steps.push(Step::ShedRoute(s.clone()));
        }
        Self {
            steps: steps.into_boxed_slice(),
        }
    }

    /// Nothing to do beyond the head's own checks.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shed::ShedSpec;
    use std::time::Duration;

    fn route(yaml_auth: crate::identity::Mode, limited: bool, max_body: Option<u64>) -> Route {
        let mut r = crate::route::tests::plain_route();
        r.auth.mode = yaml_auth;
        r.limit.enabled = limited;
        r.max_body = max_body;
        r
    }

    fn names(p: &Plan) -> Vec<&'static str> {
        p.steps()
            .iter()
            .map(|s| match s {
                Step::ShedGateway(_) => "shed_gateway",
                Step::Authenticate => "authenticate",
                Step::RateLimit => "rate_limit",
                Step::DeclaredSize(_) => "declared_size",
                Step::ShedRoute(_) => "shed_route",
            })
            .collect()
    }

    #[test]
    fn a_plain_route_has_an_empty_plan() {
        let p = Plan::compile(&route(crate::identity::Mode::None, false, None), None, None);
        assert!(p.is_empty());
        assert!(names(&p).is_empty());
    }

    #[test]
    fn steps_come_in_their_running_order_and_only_when_configured() {
        let shed = Arc::new(Shedder::new(ShedSpec {
            max_inflight: 4,
            queue: 0,
            queue_timeout: Duration::from_millis(1),
        }));
        let all = Plan::compile(
            &route(crate::identity::Mode::Required, true, Some(10)),
            Some(&shed),
            Some(&shed),
        );
        assert_eq!(
            names(&all),
            [
                "shed_gateway",
                "authenticate",
                "rate_limit",
                "declared_size",
                "shed_route"
            ]
        );
        let auth_only = Plan::compile(
            &route(crate::identity::Mode::Optional, false, None),
            None,
            None,
        );
        assert_eq!(names(&auth_only), ["authenticate"]);
        // Roles alone (auth: none with roles) still authenticate.
        let mut roles = route(crate::identity::Mode::None, false, None);
        roles.auth.roles = vec![Arc::from("admin")];
        assert_eq!(names(&Plan::compile(&roles, None, None)), ["authenticate"]);
        let sized = Plan::compile(
            &route(crate::identity::Mode::None, true, Some(7)),
            None,
            None,
        );
        assert_eq!(names(&sized), ["rate_limit", "declared_size"]);
        assert!(matches!(sized.steps()[1], Step::DeclaredSize(7)));
    }
}
