/*
 * ngx_http_wasmpool_module: serve a location with a WebAssembly wasi:http
 * component through libwasmpool.
 *
 * Every worker process creates one wasmpool_handler per component (in
 * init_process, never in the master) in poll completion mode: the engine
 * runs on threads of its own and queues its callbacks, and the handler's
 * completion fd (an eventfd) is watched by the worker's event loop. All
 * callbacks therefore run inside wasmpool_handler_poll() on the worker
 * thread, the only thread that ever calls into nginx.
 *
 * A request is pushed with wasmpool_handler_push_streaming() as soon as its
 * head is read. Its body is read unbuffered and handed to a body writer
 * chunk by chunk; while the engine holds as much as it buffers (the write
 * says WASMPOOL_WOULD_BLOCK) nginx stops reading from the client until the
 * writer's ready callback. The response head goes out with
 * ngx_http_send_header() and the body is read with wasmpool_response_read()
 * one buffer at a time: the next read only once the client took the last
 * buffer, so a slow client makes the guest wait.
 *
 * Lifetime: a per-request context (ngx_http_wasmpool_ctx_t, allocated
 * outside the request pool) carries the wasmpool objects. It is detached
 * from the request by a request pool cleanup, and freed once the request is
 * gone and the head callback, which runs exactly once for a pushed request,
 * has run.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <wasmpool.h>

#include <grp.h>
#include <poll.h>
#include <pwd.h>


/* read from a response body / written to a body writer at a time */
#define NGX_HTTP_WASMPOOL_BUF_SIZE   65536

/*
 * The longest the load check of a component may take (it compiles the
 * component when the compile cache does not have it).
 */
#define NGX_HTTP_WASMPOOL_CHECK_TIMEOUT  300000

/* callbacks run per wasmpool_handler_poll() call */
#define NGX_HTTP_WASMPOOL_POLL_MAX   64

/*
 * While requests are in flight a timer stays armed on the completion fd's
 * event: a graceful shutdown waits for the timers that are left, so the
 * worker does not exit under a request that waits for the guest (and the
 * timer is a safety net that polls now and then).
 */
#define NGX_HTTP_WASMPOOL_TICK       1000


typedef struct {
    ngx_int_t                   max_reuse;
    ngx_int_t                   max_concurrent_reuse;
    ngx_msec_t                  request_timeout;
    ngx_int_t                   max_concurrent_requests;
    ngx_int_t                   max_queued_requests;
    ngx_str_t                   cache_dir;
    ngx_str_t                   config_file; /* NUL-terminated */
    off_t                       memory_budget; /* 0: automatic */
    ngx_flag_t                  memory_budget_per_worker;
    ngx_int_t                   engine_threads;
    ngx_flag_t                  inline_run;  /* wasmpool_inline */
} ngx_http_wasmpool_knobs_t;


typedef struct {
    ngx_str_t                   path;        /* NUL-terminated */
    ngx_http_wasmpool_knobs_t   knobs;
    ngx_http_wasmpool_knobs_t  *file_base;   /* see the loc conf */

    /*
     * The libwasmpool config, made while nginx reads its configuration
     * (in the master: plain data, no threads), so workers neither read
     * the config file again nor need the right to.
     */
    wasmpool_config            *cfg;

    /* in a worker process */
    wasmpool_handler           *handler;
    ngx_connection_t           *conn;        /* wraps the completion fd */
    ngx_queue_t                 live;        /* ngx_http_wasmpool_ctx_t */
    ngx_uint_t                  nlive;
} ngx_http_wasmpool_component_t;


typedef struct {
    ngx_array_t                 components;  /* ngx_http_wasmpool_component_t * */
} ngx_http_wasmpool_main_conf_t;


typedef struct {
    ngx_str_t                   path;        /* set by wasmpool_component */
    ngx_http_wasmpool_knobs_t   knobs;
    ngx_flag_t                  serve_file;  /* wasmpool_config here */

    /*
     * With wasmpool_config: the knobs of the blocks outside the one that
     * names the file, which the file's settings override (NULL: none).
     */
    ngx_http_wasmpool_knobs_t  *file_base;
    ngx_http_wasmpool_component_t  *component;
} ngx_http_wasmpool_loc_conf_t;


typedef struct {
    ngx_http_request_t         *request;     /* NULL once the request is gone */
    ngx_http_wasmpool_component_t  *component;
    ngx_queue_t                 queue;       /* in component->live */

    wasmpool_cancel            *cancel;
    wasmpool_body_writer       *writer;
    wasmpool_response          *response;

    ngx_chain_t                *body;        /* request body not yet written */
    ngx_chain_t                *free;        /* response buffers */
    ngx_chain_t                *busy;

    uint64_t                    instance;    /* that answered; 0: none */

    unsigned                    reused:1;    /* ... and had served before */
    unsigned                    pushed:1;         /* the head callback will run */
    unsigned                    head_done:1;      /* ... and it did */
    unsigned                    cancelled:1;
    unsigned                    writer_blocked:1; /* wait for the writer */
    unsigned                    body_discard:1;   /* the guest reads no more */
    unsigned                    body_done:1;      /* the writer was finished */
    unsigned                    out_blocked:1;    /* wait for the client */
    unsigned                    response_done:1;  /* the whole body was read */
    unsigned                    finalized:1;      /* the request was finalized */
} ngx_http_wasmpool_ctx_t;


static ngx_int_t ngx_http_wasmpool_handler(ngx_http_request_t *r);
static void ngx_http_wasmpool_start(ngx_http_request_t *r);
static wasmpool_request *ngx_http_wasmpool_create_request(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_wasmpool_send_body(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx);
static void ngx_http_wasmpool_read_body_handler(ngx_http_request_t *r);
static void ngx_http_wasmpool_check_broken(ngx_http_request_t *r);
static void ngx_http_wasmpool_write_handler(ngx_http_request_t *r);
static void ngx_http_wasmpool_on_head(void *data, wasmpool_result result,
    wasmpool_response *response);
static void ngx_http_wasmpool_on_writer_ready(void *data);
static void ngx_http_wasmpool_on_response_ready(void *data);
static ngx_int_t ngx_http_wasmpool_send_head(ngx_http_request_t *r,
    wasmpool_response *response);
static void ngx_http_wasmpool_pump(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx);
static ngx_int_t ngx_http_wasmpool_send_last(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx, ngx_chain_t *data);
static void ngx_http_wasmpool_finalize(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx, ngx_int_t rc);
static ngx_int_t ngx_http_wasmpool_error_status(ngx_http_request_t *r,
    wasmpool_result result);
static void ngx_http_wasmpool_stop(ngx_http_wasmpool_ctx_t *ctx);
static void ngx_http_wasmpool_free_ctx(ngx_http_wasmpool_ctx_t *ctx);
static void ngx_http_wasmpool_terminate(void *data);
static void ngx_http_wasmpool_cleanup(void *data);
static void ngx_http_wasmpool_completion_handler(ngx_event_t *rev);
static void ngx_http_wasmpool_tick(ngx_http_wasmpool_component_t *wc);
static ngx_uint_t ngx_http_wasmpool_hop_by_hop(u_char *name, size_t len);

static ngx_int_t ngx_http_wasmpool_apply_knobs(wasmpool_config *cfg,
    ngx_http_wasmpool_knobs_t *k, ngx_conf_t *cf, ngx_log_t *log);
static ngx_int_t ngx_http_wasmpool_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_wasmpool_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_wasmpool_check_component(ngx_conf_t *cf,
    ngx_http_wasmpool_component_t *wc);
static void ngx_http_wasmpool_check_child(ngx_conf_t *cf,
    ngx_http_wasmpool_component_t *wc, int fd);
static ngx_int_t ngx_http_wasmpool_host_settings(wasmpool_config *cfg,
    ngx_http_wasmpool_knobs_t *k, ngx_uint_t workers);
static void ngx_http_wasmpool_free_config(void *data);
static ngx_connection_t *ngx_http_wasmpool_watch(ngx_cycle_t *cycle,
    ngx_fd_t fd, ngx_event_handler_pt handler, void *data);
static void ngx_http_wasmpool_on_log(void *data, wasmpool_log_level level,
    bool guest, const uint8_t *msg, size_t len);
static void ngx_http_wasmpool_log_handler(ngx_event_t *rev);
static void ngx_http_wasmpool_start_log(ngx_cycle_t *cycle);
static void ngx_http_wasmpool_stop_log(void);
static void ngx_http_wasmpool_unset_knobs(ngx_http_wasmpool_knobs_t *k);
static char *ngx_http_wasmpool_config_file(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);

static ngx_int_t ngx_http_wasmpool_add_variables(ngx_conf_t *cf);
static void *ngx_http_wasmpool_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_wasmpool_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_wasmpool_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_wasmpool_component(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_wasmpool_cache_dir(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_wasmpool_memory_budget(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_wasmpool_check_msec(ngx_conf_t *cf, void *post,
    void *data);
static ngx_int_t ngx_http_wasmpool_init_process(ngx_cycle_t *cycle);
static void ngx_http_wasmpool_exit_process(ngx_cycle_t *cycle);


/* set in exit_process: callbacks then touch no nginx request */
static ngx_uint_t  ngx_http_wasmpool_exiting;

/*
 * libwasmpool's log (guest output, its warnings) comes on engine threads:
 * its callback only writes each record to a pipe (one write of at most
 * PIPE_BUF bytes: atomic), whose read end the worker's event loop watches
 * and turns into error log lines.
 */
static ngx_connection_t  *ngx_http_wasmpool_log_conn;
static int                ngx_http_wasmpool_log_wfd = -1;
static u_char             ngx_http_wasmpool_log_buf[65536];
static size_t             ngx_http_wasmpool_log_len;


static ngx_conf_num_bounds_t  ngx_http_wasmpool_positive_u32 = {
    ngx_conf_check_num_bounds, 1, 4294967295LL
};

static ngx_conf_num_bounds_t  ngx_http_wasmpool_u32 = {
    ngx_conf_check_num_bounds, 0, 4294967295LL
};

static ngx_conf_post_t  ngx_http_wasmpool_positive_msec = {
    ngx_http_wasmpool_check_msec
};


#define NGX_HTTP_WASMPOOL_CONF                                                \
    (NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1)


static ngx_command_t  ngx_http_wasmpool_commands[] = {

    { ngx_string("wasmpool_component"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_wasmpool_component,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("wasmpool_config"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_http_wasmpool_config_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("wasmpool_max_instance_reuse_count"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.max_reuse),
      &ngx_http_wasmpool_positive_u32 },

    { ngx_string("wasmpool_max_instance_concurrent_reuse_count"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.max_concurrent_reuse),
      &ngx_http_wasmpool_positive_u32 },

    { ngx_string("wasmpool_request_timeout"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.request_timeout),
      &ngx_http_wasmpool_positive_msec },

    { ngx_string("wasmpool_max_concurrent_requests"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.max_concurrent_requests),
      &ngx_http_wasmpool_positive_u32 },

    { ngx_string("wasmpool_max_queued_requests"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.max_queued_requests),
      &ngx_http_wasmpool_u32 },

    { ngx_string("wasmpool_cache_dir"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_http_wasmpool_cache_dir,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("wasmpool_memory_budget"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_wasmpool_memory_budget,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("wasmpool_engine_threads"),
      NGX_HTTP_WASMPOOL_CONF,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.engine_threads),
      &ngx_http_wasmpool_positive_u32 },

    { ngx_string("wasmpool_inline"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_wasmpool_loc_conf_t, knobs.inline_run),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_wasmpool_module_ctx = {
    ngx_http_wasmpool_add_variables,       /* preconfiguration */
    ngx_http_wasmpool_postconfiguration,   /* postconfiguration */

    ngx_http_wasmpool_create_main_conf,    /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_wasmpool_create_loc_conf,     /* create location configuration */
    ngx_http_wasmpool_merge_loc_conf       /* merge location configuration */
};


ngx_module_t  ngx_http_wasmpool_module = {
    NGX_MODULE_V1,
    &ngx_http_wasmpool_module_ctx,         /* module context */
    ngx_http_wasmpool_commands,            /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_wasmpool_init_process,        /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_wasmpool_exit_process,        /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/*
 * $wasmpool_instance: the id of the instance that answered the request;
 * $wasmpool_reused: "1" if it had served a request before, else "0".
 * Not found ("-" in logs) for a request no instance answered.
 */
static ngx_http_variable_t  ngx_http_wasmpool_vars[] = {

    { ngx_string("wasmpool_instance"), NULL,
      ngx_http_wasmpool_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("wasmpool_reused"), NULL,
      ngx_http_wasmpool_variable, 1, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


/* request handling */


static ngx_int_t
ngx_http_wasmpool_handler(ngx_http_request_t *r)
{
    ngx_int_t                      rc;
    ngx_pool_cleanup_t            *cln;
    ngx_http_cleanup_t            *hcln;
    ngx_http_wasmpool_ctx_t       *ctx;
    ngx_http_wasmpool_loc_conf_t  *wlcf;

    wlcf = ngx_http_get_module_loc_conf(r, ngx_http_wasmpool_module);

    if (wlcf->component == NULL || wlcf->component->handler == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "wasmpool: component \"%V\" is not loaded "
                      "in this worker", &wlcf->path);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_get_module_ctx(r, ngx_http_wasmpool_module) != NULL) {
        /* an internal redirect back here: not supported */
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* the context outlives the request if a callback is still due */

    ctx = ngx_calloc(sizeof(ngx_http_wasmpool_ctx_t), r->connection->log);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        ngx_free(ctx);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->component = wlcf->component;
    ngx_queue_insert_tail(&wlcf->component->live, &ctx->queue);
    wlcf->component->nlive++;

    cln->handler = ngx_http_wasmpool_cleanup;
    cln->data = ctx;

    /* a request terminated by nginx is no longer ours to finalize */

    hcln = ngx_http_cleanup_add(r, 0);
    if (hcln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    hcln->handler = ngx_http_wasmpool_terminate;
    hcln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_wasmpool_module);

    r->request_body_no_buffering = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_wasmpool_start);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/*
 * The body handler of ngx_http_read_client_request_body(): called once,
 * with what was read of the body so far. Pushes the request and starts
 * forwarding the body.
 */

static void
ngx_http_wasmpool_start(ngx_http_request_t *r)
{
    ngx_int_t                 rc;
    wasmpool_result           wr;
    wasmpool_request         *req;
    ngx_http_wasmpool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_wasmpool_module);

    req = ngx_http_wasmpool_create_request(r);
    if (req == NULL) {
        ngx_http_wasmpool_finalize(r, ctx, NGX_HTTP_BAD_REQUEST);
        return;
    }

    ctx->cancel = wasmpool_request_cancel_handle(req);

    if (r->headers_in.content_length_n > 0 || r->headers_in.chunked) {
        wr = wasmpool_request_stream_body(req, &ctx->writer);

        if (wr == WASMPOOL_OK) {
            wr = wasmpool_body_writer_set_ready_callback(ctx->writer,
                                          ngx_http_wasmpool_on_writer_ready,
                                          ctx);
        }

        if (wr != WASMPOOL_OK) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "wasmpool: cannot stream the request body: %s",
                          wasmpool_last_error());
            wasmpool_request_free(req);
            ngx_http_wasmpool_finalize(r, ctx,
                                       NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
    }

    /* the push takes the request whatever it returns */

    wr = wasmpool_handler_push_streaming(ctx->component->handler, req,
                                         ngx_http_wasmpool_on_head, ctx);

    if (wr != WASMPOOL_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "wasmpool: push failed: %s: %s",
                      wasmpool_result_str(wr), wasmpool_last_error());
        ngx_http_wasmpool_finalize(r, ctx,
                                   ngx_http_wasmpool_error_status(r, wr));
        return;
    }

    ctx->pushed = 1;
    ngx_http_wasmpool_tick(ctx->component);

    /*
     * An inline push may have answered already: its callback runs in this
     * cycle of the event loop (posted, so not inside this handler), not
     * after the next wait for events.
     */

    if (ctx->component->knobs.inline_run != 0 && ctx->component->conn) {
        ngx_post_event(ctx->component->conn->read, &ngx_posted_events);
    }

    r->write_event_handler = ngx_http_wasmpool_write_handler;

    rc = ngx_http_wasmpool_send_body(r, ctx);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE || rc == NGX_ERROR) {
        ngx_http_wasmpool_finalize(r, ctx, rc);
    }
}


static wasmpool_request *
ngx_http_wasmpool_create_request(ngx_http_request_t *r)
{
    u_char            *method, *uri, *name;
    ngx_uint_t         i;
    ngx_list_part_t   *part;
    ngx_table_elt_t   *h;
    wasmpool_request  *req;

    method = ngx_pnalloc(r->pool, r->method_name.len + 1);
    uri = ngx_pnalloc(r->pool, r->unparsed_uri.len + 1);
    if (method == NULL || uri == NULL) {
        return NULL;
    }

    ngx_cpystrn(method, r->method_name.data, r->method_name.len + 1);
    ngx_cpystrn(uri, r->unparsed_uri.data, r->unparsed_uri.len + 1);

    req = wasmpool_request_new((char *) method, (char *) uri);
    if (req == NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "wasmpool: invalid request \"%s %s\": %s",
                      method, uri, wasmpool_last_error());
        return NULL;
    }

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == 0
            || ngx_http_wasmpool_hop_by_hop(h[i].key.data, h[i].key.len))
        {
            continue;
        }

        name = ngx_pnalloc(r->pool, h[i].key.len + 1);
        if (name == NULL) {
            wasmpool_request_free(req);
            return NULL;
        }

        ngx_cpystrn(name, h[i].key.data, h[i].key.len + 1);

        if (wasmpool_request_add_header(req, (char *) name, h[i].value.data,
                                        h[i].value.len)
            != WASMPOOL_OK)
        {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "wasmpool: request header \"%V\" skipped: %s",
                          &h[i].key, wasmpool_last_error());
        }
    }

    return req;
}


/*
 * Forwards the request body: what nginx read is written to the body writer,
 * more is read from the client only once the writer took all of it. Returns
 * NGX_OK (the body is through), NGX_AGAIN (waiting for the client or the
 * writer) or an HTTP status / NGX_ERROR to finalize the request with.
 */

static ngx_int_t
ngx_http_wasmpool_send_body(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx)
{
    size_t                    size;
    ngx_int_t                 rc;
    ngx_buf_t                *b;
    ngx_chain_t              *cl, **ll;
    wasmpool_result           wr;
    ngx_http_request_body_t  *rb;

    rb = r->request_body;

    for ( ;; ) {

        /* take what nginx read since the last time */

        if (rb && rb->bufs) {
            for (ll = &ctx->body; *ll; ll = &(*ll)->next) { /* void */ }
            *ll = rb->bufs;
            rb->bufs = NULL;
        }

        for (cl = ctx->body; cl; cl = cl->next) {
            b = cl->buf;

            if (b->in_file) {
                /* not with request_body_no_buffering */
                ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                              "wasmpool: request body buffered in a file");
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            while (b->pos < b->last) {

                if (ctx->writer == NULL || ctx->body_discard) {
                    b->pos = b->last;
                    break;
                }

                size = ngx_min((size_t) (b->last - b->pos),
                               NGX_HTTP_WASMPOOL_BUF_SIZE);

                wr = wasmpool_body_writer_write(ctx->writer, b->pos, size);

                if (wr == WASMPOOL_OK) {
                    b->pos += size;
                    continue;
                }

                if (wr == WASMPOOL_WOULD_BLOCK) {

                    /*
                     * The engine holds as much as it buffers: keep the rest
                     * and stop reading from the client (and its timer: the
                     * wait is the guest's) until the ready callback.
                     */

                    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                                   "wasmpool: body writer full, "
                                   "reading paused");

                    ctx->body = cl;
                    ctx->writer_blocked = 1;

                    if (r->connection->read->timer_set) {
                        ngx_del_timer(r->connection->read);
                    }

                    ngx_http_block_reading(r);

                    return NGX_AGAIN;
                }

                /*
                 * WASMPOOL_CANCELLED and the like: the request is over for
                 * the engine (the guest answered without reading on, or it
                 * failed); the rest of the body is read and dropped.
                 */

                ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                               "wasmpool: request body dropped: %s",
                               wasmpool_result_str(wr));

                ctx->body_discard = 1;
                b->pos = b->last;
            }
        }

        ctx->body = NULL;

        if (!r->reading_body) {
            break;
        }

        /* read more from the client */

        r->read_event_handler = ngx_http_wasmpool_read_body_handler;

        rc = ngx_http_read_unbuffered_request_body(r);

        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            return rc;
        }

        if (rc == NGX_AGAIN && (rb == NULL || rb->bufs == NULL)) {
            return NGX_AGAIN;
        }

        /* NGX_OK (the end) or more to write */
    }

    /* the whole body was read */

    if (ctx->writer && !ctx->body_done) {
        ctx->body_done = 1;

        if (!ctx->body_discard) {
            wr = wasmpool_body_writer_finish(ctx->writer);

            if (wr != WASMPOOL_OK) {
                ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                               "wasmpool: request body finish: %s",
                               wasmpool_result_str(wr));
            }
        }
    }

    /* from now on, only watch for a client that goes away */

    r->read_event_handler = ngx_http_wasmpool_check_broken;

    return NGX_OK;
}


static void
ngx_http_wasmpool_read_body_handler(ngx_http_request_t *r)
{
    ngx_int_t                 rc;
    ngx_http_wasmpool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_wasmpool_module);

    if (ctx == NULL || ctx->finalized || ctx->writer_blocked) {
        return;
    }

    rc = ngx_http_wasmpool_send_body(r, ctx);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE || rc == NGX_ERROR) {
        ngx_http_wasmpool_finalize(r, ctx, rc);
    }
}


/*
 * The read handler once the body is read: a client that closes its
 * connection cancels the request (as ngx_http_upstream's
 * check_broken_connection).
 */

static void
ngx_http_wasmpool_check_broken(ngx_http_request_t *r)
{
    int                       n;
    char                      buf[1];
    ngx_err_t                 err;
    ngx_event_t              *rev;
    ngx_connection_t         *c;
    ngx_http_wasmpool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_wasmpool_module);

    if (ctx == NULL || ctx->finalized) {
        return;
    }

    c = r->connection;
    rev = c->read;
    err = 0;

    if (c->error) {
        goto closed;
    }

#if (NGX_HTTP_V2)
    if (r->stream) {
        return;
    }
#endif

#if (NGX_HAVE_EPOLLRDHUP)

    if ((ngx_event_flags & NGX_USE_EPOLL_EVENT) && ngx_use_epoll_rdhup) {
        socklen_t  len;

        if (!rev->pending_eof) {
            return;
        }

        rev->eof = 1;
        c->error = 1;

        len = sizeof(ngx_err_t);

        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len)
            == -1)
        {
            err = ngx_socket_errno;
        }

        goto closed;
    }

#endif

    n = recv(c->fd, buf, 1, MSG_PEEK);

    err = ngx_socket_errno;

    if (n > 0 || (n == -1 && err == NGX_EAGAIN)) {

        /* pipelined data, or nothing: the client is there */

        if ((ngx_event_flags & NGX_USE_LEVEL_EVENT) && rev->active) {
            if (ngx_del_event(rev, NGX_READ_EVENT, 0) != NGX_OK) {
                ngx_http_wasmpool_finalize(r, ctx,
                                           NGX_HTTP_INTERNAL_SERVER_ERROR);
            }
        }

        return;
    }

    if (n == 0) {
        err = 0;
    }

    rev->eof = 1;
    c->error = 1;

closed:

    if (err) {
        rev->error = 1;
    }

    ngx_log_error(NGX_LOG_INFO, c->log, err,
                  "client prematurely closed connection, "
                  "wasmpool request cancelled");

    ngx_http_wasmpool_finalize(r, ctx, NGX_HTTP_CLIENT_CLOSED_REQUEST);
}


/* the client can take more of the response */

static void
ngx_http_wasmpool_write_handler(ngx_http_request_t *r)
{
    ngx_connection_t         *c;
    ngx_http_wasmpool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_wasmpool_module);

    if (ctx == NULL || ctx->finalized) {
        return;
    }

    c = r->connection;

    if (c->write->timedout) {
        c->timedout = 1;
        ngx_connection_error(c, NGX_ETIMEDOUT, "client timed out");
        ngx_http_wasmpool_finalize(r, ctx, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }

    if (ctx->response == NULL || !ctx->out_blocked) {
        return;
    }

    ngx_http_wasmpool_pump(r, ctx);
}


/* wasmpool callbacks: all run inside wasmpool_handler_poll() */


static void
ngx_http_wasmpool_on_head(void *data, wasmpool_result result,
    wasmpool_response *response)
{
    ngx_http_wasmpool_ctx_t *ctx = data;

    ngx_int_t            rc;
    wasmpool_result      wr;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    ctx->head_done = 1;

    r = ctx->request;

    if (r == NULL || ctx->finalized || ngx_http_wasmpool_exiting) {

        /* nobody waits for it any more */

        wasmpool_response_free(response);

        if (r == NULL) {
            ngx_http_wasmpool_free_ctx(ctx);
        }

        return;
    }

    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    if (result != WASMPOOL_OK) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0, "wasmpool: %s: %s",
                      wasmpool_result_str(result), wasmpool_last_error());

        ctx->response_done = 1;
        ngx_http_wasmpool_finalize(r, ctx,
                                   ngx_http_wasmpool_error_status(r, result));
        ngx_http_run_posted_requests(c);
        return;
    }

    ctx->response = response;
    ctx->instance = wasmpool_response_instance_id(response);
    ctx->reused = wasmpool_response_reused(response) ? 1 : 0;

    wr = wasmpool_response_set_ready_callback(response,
                                          ngx_http_wasmpool_on_response_ready,
                                          ctx);
    if (wr != WASMPOOL_OK) {
        ngx_log_error(NGX_LOG_ERR, c->log, 0,
                      "wasmpool: cannot read the response: %s",
                      wasmpool_last_error());
        ngx_http_wasmpool_finalize(r, ctx, NGX_HTTP_INTERNAL_SERVER_ERROR);
        ngx_http_run_posted_requests(c);
        return;
    }

    rc = ngx_http_wasmpool_send_head(r, response);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {

        /* no body to send (HEAD, 304, an error): stop the guest's */

        ngx_http_wasmpool_finalize(r, ctx, rc);
        ngx_http_run_posted_requests(c);
        return;
    }

    ngx_http_wasmpool_pump(r, ctx);
    ngx_http_run_posted_requests(c);
}


static void
ngx_http_wasmpool_on_writer_ready(void *data)
{
    ngx_http_wasmpool_ctx_t *ctx = data;

    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;

    if (r == NULL || ctx->finalized || ngx_http_wasmpool_exiting) {
        return;
    }

    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "wasmpool: body writer ready");

    ctx->writer_blocked = 0;

    rc = ngx_http_wasmpool_send_body(r, ctx);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE || rc == NGX_ERROR) {
        ngx_http_wasmpool_finalize(r, ctx, rc);
    }

    ngx_http_run_posted_requests(c);
}


static void
ngx_http_wasmpool_on_response_ready(void *data)
{
    ngx_http_wasmpool_ctx_t *ctx = data;

    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;

    if (r == NULL || ctx->finalized || ctx->response == NULL
        || ngx_http_wasmpool_exiting)
    {
        return;
    }

    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    ngx_http_wasmpool_pump(r, ctx);
    ngx_http_run_posted_requests(c);
}


/* response */


static ngx_int_t
ngx_http_wasmpool_copy_str(ngx_pool_t *pool, ngx_str_t *dst,
    const uint8_t *src, size_t len)
{
    dst->data = ngx_pnalloc(pool, len + 1);
    if (dst->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(dst->data, src, len);
    dst->data[len] = '\0';
    dst->len = len;

    return NGX_OK;
}


static ngx_int_t
ngx_http_wasmpool_send_head(ngx_http_request_t *r, wasmpool_response *response)
{
    off_t             length;
    size_t            i, n, name_len, value_len;
    u_char           *p;
    ngx_table_elt_t  *h;
    const uint8_t    *name, *value;

    r->headers_out.status = wasmpool_response_status(response);

    n = wasmpool_response_header_count(response);

    for (i = 0; i < n; i++) {

        if (wasmpool_response_header(response, i, &name, &name_len,
                                     &value, &value_len)
            != WASMPOOL_OK)
        {
            continue;
        }

        if (ngx_http_wasmpool_hop_by_hop((u_char *) name, name_len)) {
            continue;
        }

        if (name_len == sizeof("Content-Length") - 1
            && ngx_strncasecmp((u_char *) name, (u_char *) "Content-Length",
                               name_len) == 0)
        {
            /* nginx writes it (or sends the body chunked) */

            length = ngx_atoof((u_char *) value, value_len);

            if (length != NGX_ERROR) {
                r->headers_out.content_length_n = length;
            }

            continue;
        }

        if (name_len == sizeof("Content-Type") - 1
            && ngx_strncasecmp((u_char *) name, (u_char *) "Content-Type",
                               name_len) == 0)
        {
            if (ngx_http_wasmpool_copy_str(r->pool,
                                           &r->headers_out.content_type,
                                           value, value_len)
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            /* the type without its parameters */

            p = ngx_strlchr(r->headers_out.content_type.data,
                            r->headers_out.content_type.data + value_len,
                            ';');

            r->headers_out.content_type_len = p
                ? (size_t) (p - r->headers_out.content_type.data)
                : value_len;

            while (r->headers_out.content_type_len
                   && r->headers_out.content_type.data[
                          r->headers_out.content_type_len - 1] == ' ')
            {
                r->headers_out.content_type_len--;
            }

            r->headers_out.content_type_lowcase = NULL;
            continue;
        }

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        if (ngx_http_wasmpool_copy_str(r->pool, &h->key, name, name_len)
            != NGX_OK
            || ngx_http_wasmpool_copy_str(r->pool, &h->value, value, value_len)
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        h->hash = 1;

        h->lowcase_key = ngx_pnalloc(r->pool, name_len);
        if (h->lowcase_key == NULL) {
            return NGX_ERROR;
        }

        ngx_strlow(h->lowcase_key, h->key.data, name_len);

        /* nginx adds its own Date and Server unless these are set */

        if (name_len == sizeof("Date") - 1
            && ngx_strncmp(h->lowcase_key, "date", name_len) == 0)
        {
            r->headers_out.date = h;

        } else if (name_len == sizeof("Server") - 1
                   && ngx_strncmp(h->lowcase_key, "server", name_len) == 0)
        {
            r->headers_out.server = h;
        }
    }

    return ngx_http_send_header(r);
}


/*
 * Moves the response body from the guest to the client: a read only when
 * the client took what was sent before (or nginx buffered it), so the guest
 * runs no faster than the client reads.
 */

static void
ngx_http_wasmpool_pump(ngx_http_request_t *r, ngx_http_wasmpool_ctx_t *ctx)
{
    size_t                     n;
    ngx_int_t                  rc;
    ngx_buf_t                 *b;
    ngx_chain_t               *cl;
    wasmpool_result            wr;
    ngx_connection_t          *c;
    ngx_http_core_loc_conf_t  *clcf;

    c = r->connection;

    for ( ;; ) {

        if (ctx->busy || c->buffered) {

            /* flush what is pending first */

            rc = ngx_http_output_filter(r, NULL);

            if (rc == NGX_ERROR) {
                ngx_http_wasmpool_finalize(r, ctx, NGX_ERROR);
                return;
            }

            cl = NULL;
            ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &cl,
                                    (ngx_buf_tag_t) &ngx_http_wasmpool_module);

            if (ctx->busy || c->buffered) {

                /* the client is slow: wait for the write event */

                ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0,
                               "wasmpool: client busy, response paused");

                ctx->out_blocked = 1;

                clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

                if (ngx_handle_write_event(c->write, clcf->send_lowat)
                    != NGX_OK)
                {
                    ngx_http_wasmpool_finalize(r, ctx, NGX_ERROR);
                    return;
                }

                /* (a delayed event, limit_rate, has its timer already) */

                if (!c->write->delayed) {
                    if (c->write->active && !c->write->ready) {
                        ngx_add_timer(c->write, clcf->send_timeout);

                    } else if (c->write->timer_set) {
                        ngx_del_timer(c->write);
                    }
                }

                return;
            }
        }

        ctx->out_blocked = 0;

        if (c->write->timer_set && !c->write->delayed) {
            ngx_del_timer(c->write);
        }

        cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
        if (cl == NULL) {
            ngx_http_wasmpool_finalize(r, ctx, NGX_ERROR);
            return;
        }

        b = cl->buf;

        if (b->start == NULL) {
            b->start = ngx_palloc(r->pool, NGX_HTTP_WASMPOOL_BUF_SIZE);
            if (b->start == NULL) {
                ngx_http_wasmpool_finalize(r, ctx, NGX_ERROR);
                return;
            }

            b->end = b->start + NGX_HTTP_WASMPOOL_BUF_SIZE;
            b->temporary = 1;
            b->tag = (ngx_buf_tag_t) &ngx_http_wasmpool_module;
        }

        b->pos = b->start;
        b->last = b->start;

        n = 0;
        wr = wasmpool_response_read(ctx->response, b->start,
                                    b->end - b->start, &n);

        if (wr != WASMPOOL_OK || n == 0) {
            cl->next = ctx->free;
            ctx->free = cl;
        }

        if (wr == WASMPOOL_WOULD_BLOCK) {
            /* the response's ready callback calls again */
            ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0,
                           "wasmpool: response read would block");
            return;
        }

        if (wr != WASMPOOL_OK) {

            /*
             * The body failed after the head went out: close the
             * connection so that the response does not look complete.
             */

            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "wasmpool: response body failed: %s: %s",
                          wasmpool_result_str(wr), wasmpool_last_error());

            ngx_http_wasmpool_finalize(r, ctx, NGX_ERROR);
            return;
        }

        if (n == 0) {
            rc = ngx_http_wasmpool_send_last(r, ctx, NULL);
            ngx_http_wasmpool_finalize(r, ctx, rc);
            return;
        }

        b->last = b->start + n;
        cl->next = NULL;

        /*
         * Fill the buffer with what the guest has ready: a response that
         * is already complete goes out whole, head, body and end, in one
         * write.
         */

        while (b->last < b->end) {
            n = 0;
            wr = wasmpool_response_read(ctx->response, b->last,
                                        b->end - b->last, &n);
            if (wr != WASMPOOL_OK || n == 0) {
                break;
            }

            b->last += n;
        }

        if (wr == WASMPOOL_OK && n == 0) {
            rc = ngx_http_wasmpool_send_last(r, ctx, cl);
            ngx_http_wasmpool_finalize(r, ctx, rc);
            return;
        }

        /* more to come (or a failure, which the next read reports again) */

        b->flush = 1;

        rc = ngx_http_output_filter(r, cl);

        if (rc == NGX_ERROR) {
            ngx_http_wasmpool_finalize(r, ctx, NGX_ERROR);
            return;
        }

        ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &cl,
                                (ngx_buf_tag_t) &ngx_http_wasmpool_module);
    }
}


/*
 * The end of the body: the trailers, if any, and the last buffer, after
 * "data" (the body's last bytes, or NULL).
 */

static ngx_int_t
ngx_http_wasmpool_send_last(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx, ngx_chain_t *data)
{
    size_t            i, n, name_len, value_len;
    ngx_int_t         rc;
    ngx_buf_t        *b;
    ngx_chain_t       out;
    ngx_table_elt_t  *h;
    const uint8_t    *name, *value;

    ctx->response_done = 1;

    n = wasmpool_response_trailer_count(ctx->response);

    for (i = 0; i < n; i++) {

        if (wasmpool_response_trailer(ctx->response, i, &name, &name_len,
                                      &value, &value_len)
            != WASMPOOL_OK)
        {
            continue;
        }

        h = ngx_list_push(&r->headers_out.trailers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        if (ngx_http_wasmpool_copy_str(r->pool, &h->key, name, name_len)
            != NGX_OK
            || ngx_http_wasmpool_copy_str(r->pool, &h->value, value, value_len)
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        h->hash = 1;
        h->lowcase_key = h->key.data;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    if (data == NULL) {
        return ngx_http_output_filter(r, &out);
    }

    data->next = &out;

    rc = ngx_http_output_filter(r, data);

    /* the data buffer goes back to the free list once it is sent */

    data->next = NULL;
    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &data,
                            (ngx_buf_tag_t) &ngx_http_wasmpool_module);

    return rc;
}


/*
 * Finalizes the request, exactly once, and stops what still runs for it in
 * wasmpool. The context may be freed in here (by the request's pool
 * cleanup): the caller must not touch it afterwards.
 */

static void
ngx_http_wasmpool_finalize(ngx_http_request_t *r,
    ngx_http_wasmpool_ctx_t *ctx, ngx_int_t rc)
{
    if (ctx->finalized) {
        return;
    }

    ctx->finalized = 1;

    ngx_http_wasmpool_stop(ctx);

    if (r->header_sent
        && rc >= NGX_HTTP_SPECIAL_RESPONSE
        && rc != NGX_HTTP_REQUEST_TIME_OUT
        && rc != NGX_HTTP_CLIENT_CLOSED_REQUEST)
    {
        /* too late for an error page: cut the response short */
        rc = NGX_ERROR;
    }

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_http_wasmpool_error_status(ngx_http_request_t *r, wasmpool_result result)
{
    ngx_table_elt_t  *h;

    switch (result) {

    case WASMPOOL_OVERLOADED:
    case WASMPOOL_SHUTTING_DOWN:

        h = ngx_list_push(&r->headers_out.headers);
        if (h != NULL) {
            h->hash = 1;
            ngx_str_set(&h->key, "Retry-After");
            ngx_str_set(&h->value, "1");
            h->lowcase_key = (u_char *) "retry-after";
        }

        return NGX_HTTP_SERVICE_UNAVAILABLE;

    case WASMPOOL_TIMEOUT:
        return NGX_HTTP_GATEWAY_TIME_OUT;

    case WASMPOOL_TOO_LARGE:
        return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;

    case WASMPOOL_CANCELLED:
        return NGX_HTTP_CLIENT_CLOSED_REQUEST;

    default: /* WASMPOOL_TRAP, WASMPOOL_GUEST_ERROR, ... */
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}


/*
 * Cancels what still runs in wasmpool for the request and frees its body
 * writer and response (in poll mode no ready callback runs after that).
 */

static void
ngx_http_wasmpool_stop(ngx_http_wasmpool_ctx_t *ctx)
{
    if (ctx->pushed && !ctx->response_done && !ctx->cancelled
        && ctx->cancel)
    {
        ctx->cancelled = 1;

        /* WASMPOOL_MISUSE if the request was over already: harmless */
        (void) wasmpool_cancel_request(ctx->cancel);
    }

    wasmpool_body_writer_free(ctx->writer);
    ctx->writer = NULL;

    wasmpool_response_free(ctx->response);
    ctx->response = NULL;
}


static void
ngx_http_wasmpool_free_ctx(ngx_http_wasmpool_ctx_t *ctx)
{
    ngx_http_wasmpool_stop(ctx);

    wasmpool_cancel_free(ctx->cancel);

    ngx_queue_remove(&ctx->queue);
    ctx->component->nlive--;

    ngx_free(ctx);
}


/* ngx_http_terminate_request(): the request is closed without us */

static void
ngx_http_wasmpool_terminate(void *data)
{
    ngx_http_wasmpool_ctx_t *ctx = data;

    if (ctx->request == NULL) {
        return;
    }

    ctx->finalized = 1;
    ngx_http_wasmpool_stop(ctx);
}


/* the request pool goes: the request is gone for good */

static void
ngx_http_wasmpool_cleanup(void *data)
{
    ngx_http_wasmpool_ctx_t *ctx = data;

    ctx->request = NULL;
    ctx->finalized = 1;

    if (ctx->pushed && !ctx->head_done) {

        /* the head callback frees the context when it runs */

        ngx_http_wasmpool_stop(ctx);
        return;
    }

    ngx_http_wasmpool_free_ctx(ctx);
}


/* the completion fd */


static void
ngx_http_wasmpool_completion_handler(ngx_event_t *rev)
{
    ngx_connection_t               *c;
    ngx_http_wasmpool_component_t  *wc;

    c = rev->data;
    wc = c->data;

    rev->timedout = 0;

    if (wc->handler == NULL) {
        return;
    }

    /*
     * The event is edge-triggered under epoll: run every waiting callback
     * (the eventfd is reset when the queue runs empty, and set again by
     * the next completion).
     */

    while (wasmpool_handler_poll(wc->handler, NGX_HTTP_WASMPOOL_POLL_MAX)
           > 0)
    {
        /* void */
    }

    ngx_http_wasmpool_tick(wc);
}


static void
ngx_http_wasmpool_tick(ngx_http_wasmpool_component_t *wc)
{
    ngx_event_t  *rev;

    if (wc->conn == NULL) {
        return;
    }

    rev = wc->conn->read;

    if (wc->nlive > 0) {
        if (!rev->timer_set) {
            ngx_add_timer(rev, NGX_HTTP_WASMPOOL_TICK);
        }

    } else if (rev->timer_set) {
        ngx_del_timer(rev);
    }
}


/* header names that concern one connection, never passed on */

static ngx_uint_t
ngx_http_wasmpool_hop_by_hop(u_char *name, size_t len)
{
    ngx_uint_t  i;

    static ngx_str_t  names[] = {
        ngx_string("connection"),
        ngx_string("keep-alive"),
        ngx_string("proxy-connection"),
        ngx_string("transfer-encoding"),
        ngx_string("te"),
        ngx_string("trailer"),
        ngx_string("upgrade"),
        ngx_null_string
    };

    for (i = 0; names[i].len; i++) {
        if (names[i].len == len
            && ngx_strncasecmp(name, names[i].data, len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static ngx_int_t
ngx_http_wasmpool_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                   *p;
    ngx_http_wasmpool_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_wasmpool_module);

    if (ctx == NULL || ctx->instance == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    if (data == 1) {
        p = (u_char *) (ctx->reused ? "1" : "0");
        v->len = 1;

    } else {
        p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->len = ngx_sprintf(p, "%uL", ctx->instance) - p;
    }

    v->data = p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}


/* configuration */


static ngx_int_t
ngx_http_wasmpool_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_wasmpool_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static void *
ngx_http_wasmpool_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_wasmpool_main_conf_t  *wmcf;

    wmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_wasmpool_main_conf_t));
    if (wmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&wmcf->components, cf->pool, 4,
                       sizeof(ngx_http_wasmpool_component_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return wmcf;
}


static void *
ngx_http_wasmpool_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_wasmpool_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_wasmpool_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->path = { 0, NULL };
     *     conf->component = NULL;
     *     conf->file_base = NULL;
     */

    ngx_http_wasmpool_unset_knobs(&conf->knobs);
    conf->serve_file = NGX_CONF_UNSET;

    return conf;
}


static void
ngx_http_wasmpool_unset_knobs(ngx_http_wasmpool_knobs_t *k)
{
    ngx_memzero(k, sizeof(ngx_http_wasmpool_knobs_t));

    k->max_reuse = NGX_CONF_UNSET;
    k->max_concurrent_reuse = NGX_CONF_UNSET;
    k->request_timeout = NGX_CONF_UNSET_MSEC;
    k->max_concurrent_requests = NGX_CONF_UNSET;
    k->max_queued_requests = NGX_CONF_UNSET;
    k->memory_budget = NGX_CONF_UNSET;
    k->memory_budget_per_worker = NGX_CONF_UNSET;
    k->engine_threads = NGX_CONF_UNSET;
    k->inline_run = NGX_CONF_UNSET;
}


static ngx_uint_t
ngx_http_wasmpool_same_knobs(ngx_http_wasmpool_knobs_t *a,
    ngx_http_wasmpool_knobs_t *b)
{
    return a->max_reuse == b->max_reuse
           && a->max_concurrent_reuse == b->max_concurrent_reuse
           && a->request_timeout == b->request_timeout
           && a->max_concurrent_requests == b->max_concurrent_requests
           && a->max_queued_requests == b->max_queued_requests
           && a->memory_budget == b->memory_budget
           && a->memory_budget_per_worker == b->memory_budget_per_worker
           && a->engine_threads == b->engine_threads
           && a->inline_run == b->inline_run
           && a->cache_dir.len == b->cache_dir.len
           && ngx_strncmp(a->cache_dir.data, b->cache_dir.data,
                          a->cache_dir.len) == 0
           && a->config_file.len == b->config_file.len
           && ngx_strncmp(a->config_file.data, b->config_file.data,
                          a->config_file.len) == 0;
}


static char *
ngx_http_wasmpool_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_wasmpool_loc_conf_t *prev = parent;
    ngx_http_wasmpool_loc_conf_t *conf = child;

    size_t                           len;
    ngx_uint_t                       i;
    const char                      *file_component;
    wasmpool_config                 *cfg;
    ngx_pool_cleanup_t              *cln;
    ngx_http_wasmpool_knobs_t       *k, *pk, outer;
    ngx_http_wasmpool_component_t   *wc, **wcp;
    ngx_http_wasmpool_main_conf_t   *wmcf;

    k = &conf->knobs;
    pk = &prev->knobs;

    /*
     * The more specific wins: the knobs of outer blocks go under the
     * file of wasmpool_config, the directives of its own block and of the
     * blocks inside it over it.
     */

    if (k->config_file.data != NULL) {
        conf->file_base = ngx_palloc(cf->pool,
                                     sizeof(ngx_http_wasmpool_knobs_t));
        if (conf->file_base == NULL) {
            return NGX_CONF_ERROR;
        }

        *conf->file_base = *pk;
        ngx_str_null(&conf->file_base->config_file);

        ngx_http_wasmpool_unset_knobs(&outer);
        pk = &outer;

    } else {
        conf->file_base = prev->file_base;
    }

    /* unset knobs keep libwasmpool's defaults */

    ngx_conf_merge_value(k->max_reuse, pk->max_reuse, NGX_CONF_UNSET);
    ngx_conf_merge_value(k->max_concurrent_reuse, pk->max_concurrent_reuse,
                         NGX_CONF_UNSET);
    ngx_conf_merge_msec_value(k->request_timeout, pk->request_timeout,
                              NGX_CONF_UNSET_MSEC);
    ngx_conf_merge_value(k->max_concurrent_requests,
                         pk->max_concurrent_requests, NGX_CONF_UNSET);
    ngx_conf_merge_value(k->max_queued_requests, pk->max_queued_requests,
                         NGX_CONF_UNSET);
    ngx_conf_merge_str_value(k->cache_dir, pk->cache_dir, "");
    ngx_conf_merge_str_value(k->config_file, pk->config_file, "");
    ngx_conf_merge_off_value(k->memory_budget, pk->memory_budget,
                             NGX_CONF_UNSET);
    ngx_conf_merge_value(k->memory_budget_per_worker,
                         pk->memory_budget_per_worker, 0);
    ngx_conf_merge_value(k->engine_threads, pk->engine_threads,
                         NGX_CONF_UNSET);
    ngx_conf_merge_value(k->inline_run, pk->inline_run, NGX_CONF_UNSET);

    /*
     * A location is served by wasmpool_component, or by wasmpool_config
     * in the location itself (its file's component). Neither is
     * inherited by nested locations.
     */

    if (conf->serve_file == NGX_CONF_UNSET) {
        conf->serve_file = 0;
    }

    if (conf->path.len == 0 && !conf->serve_file) {
        return NGX_CONF_OK;
    }

    /* the config libwasmpool will run with, checked by libwasmpool */

    cfg = wasmpool_config_new();
    if (cfg == NULL) {
        return NGX_CONF_ERROR;
    }

    if ((conf->file_base
         && ngx_http_wasmpool_apply_knobs(cfg, conf->file_base, cf, cf->log)
            != NGX_OK)
        || ngx_http_wasmpool_apply_knobs(cfg, k, cf, cf->log) != NGX_OK)
    {
        wasmpool_config_free(cfg);
        return NGX_CONF_ERROR;
    }

    if (conf->path.len == 0) {
        file_component = wasmpool_config_component(cfg);

        if (file_component == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "wasmpool_config \"%V\" names no component: "
                               "set \"component\" in it or use "
                               "wasmpool_component", &k->config_file);
            wasmpool_config_free(cfg);
            return NGX_CONF_ERROR;
        }

        len = ngx_strlen(file_component);

        conf->path.data = ngx_pnalloc(cf->pool, len + 1);
        if (conf->path.data == NULL) {
            wasmpool_config_free(cfg);
            return NGX_CONF_ERROR;
        }

        ngx_memcpy(conf->path.data, file_component, len + 1);
        conf->path.len = len;
    }

    /* one handler per component and set of knobs */

    wmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_wasmpool_module);

    wcp = wmcf->components.elts;

    for (i = 0; i < wmcf->components.nelts; i++) {
        wc = wcp[i];

        if (wc->path.len == conf->path.len
            && ngx_strncmp(wc->path.data, conf->path.data, wc->path.len) == 0
            && ngx_http_wasmpool_same_knobs(&wc->knobs, k)
            && (wc->file_base == conf->file_base
                || (wc->file_base && conf->file_base
                    && ngx_http_wasmpool_same_knobs(wc->file_base,
                                                    conf->file_base))))
        {
            wasmpool_config_free(cfg);
            conf->component = wc;
            return NGX_CONF_OK;
        }
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        wasmpool_config_free(cfg);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_wasmpool_free_config;
    cln->data = cfg;

    wc = ngx_pcalloc(cf->pool, sizeof(ngx_http_wasmpool_component_t));
    if (wc == NULL) {
        return NGX_CONF_ERROR;
    }

    wc->path = conf->path;
    wc->knobs = *k;
    wc->file_base = conf->file_base;
    wc->cfg = cfg;
    ngx_queue_init(&wc->live);

    wcp = ngx_array_push(&wmcf->components);
    if (wcp == NULL) {
        return NGX_CONF_ERROR;
    }

    *wcp = wc;
    conf->component = wc;

    return NGX_CONF_OK;
}


static char *
ngx_http_wasmpool_component(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_wasmpool_loc_conf_t *wlcf = conf;

    ngx_str_t                 *value, path;
    ngx_file_info_t            fi;
    ngx_http_core_loc_conf_t  *clcf;

    if (wlcf->path.len) {
        return "is duplicate";
    }

    value = cf->args->elts;
    path = value[1];

    if (path.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "empty wasmpool_component path");
        return NGX_CONF_ERROR;
    }

    /* relative to the prefix; the result is NUL-terminated */

    if (ngx_conf_full_name(cf->cycle, &path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* fail "nginx -t" for a component that is not there */

    if (ngx_file_info(path.data, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "wasmpool_component \"%V\" cannot be read", &path);
        return NGX_CONF_ERROR;
    }

    if (!ngx_is_file(&fi)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "wasmpool_component \"%V\" is not a file", &path);
        return NGX_CONF_ERROR;
    }

    if (access((char *) path.data, R_OK) != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "wasmpool_component \"%V\" cannot be read", &path);
        return NGX_CONF_ERROR;
    }

    wlcf->path = path;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_wasmpool_handler;

    return NGX_CONF_OK;
}


/*
 *   wasmpool_config FILE;
 *
 * The TOML file of "wasmpool serve --config" (relative paths: to nginx's
 * configuration prefix). In a location it also serves the location, with
 * the file's component unless wasmpool_component names one.
 */

static char *
ngx_http_wasmpool_config_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_wasmpool_loc_conf_t *wlcf = conf;

    ngx_str_t                 *value, path;
    ngx_http_core_loc_conf_t  *clcf;

    if (wlcf->knobs.config_file.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    path = value[1];

    if (path.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "empty wasmpool_config path");
        return NGX_CONF_ERROR;
    }

    if (ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    wlcf->knobs.config_file = path;

    if (cf->cmd_type == NGX_HTTP_LOC_CONF) {
        wlcf->serve_file = 1;

        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
        clcf->handler = ngx_http_wasmpool_handler;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_wasmpool_cache_dir(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_wasmpool_loc_conf_t *wlcf = conf;

    ngx_str_t  *value, path;

    if (wlcf->knobs.cache_dir.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    path = value[1];

    if (path.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "empty wasmpool_cache_dir path");
        return NGX_CONF_ERROR;
    }

    if (ngx_conf_full_name(cf->cycle, &path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    wlcf->knobs.cache_dir = path;

    return NGX_CONF_OK;
}


/*
 *   wasmpool_memory_budget SIZE|auto [per_worker];
 *
 * SIZE is what all workers may use together (each gets SIZE divided by
 * worker_processes), or with "per_worker" what each worker may use;
 * "auto" is the cgroup's memory limit, else physical memory, less a
 * quarter for the processes themselves.
 */

static char *
ngx_http_wasmpool_memory_budget(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_wasmpool_loc_conf_t *wlcf = conf;

    off_t       size;
    ngx_str_t  *value;

    if (wlcf->knobs.memory_budget != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 4 && ngx_strncmp(value[1].data, "auto", 4) == 0) {
        size = 0;

    } else {
        size = ngx_parse_offset(&value[1]);

        if (size == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid wasmpool_memory_budget \"%V\"",
                               &value[1]);
            return NGX_CONF_ERROR;
        }

        if (size < 65536) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "wasmpool_memory_budget \"%V\" is less "
                               "than 64k", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    wlcf->knobs.memory_budget = size;
    wlcf->knobs.memory_budget_per_worker = 0;

    if (cf->args->nelts == 3) {
        if (ngx_strcmp(value[2].data, "per_worker") != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }

        wlcf->knobs.memory_budget_per_worker = 1;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_wasmpool_check_msec(ngx_conf_t *cf, void *post, void *data)
{
    ngx_msec_t  *mp = data;

    if (*mp == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "value must be greater than 0");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * Sets the knobs on a libwasmpool config: the config file's first, then
 * the directives', which win; reports what libwasmpool refuses (with cf:
 * in nginx -t's "in FILE:LINE" form).
 */

static ngx_int_t
ngx_http_wasmpool_apply_knobs(wasmpool_config *cfg,
    ngx_http_wasmpool_knobs_t *k, ngx_conf_t *cf, ngx_log_t *log)
{
    const char       *knob;
    wasmpool_result   wr;

    wr = WASMPOOL_OK;
    knob = NULL;

    if (k->config_file.len) {
        knob = "wasmpool_config";
        wr = wasmpool_config_load_file(cfg, (char *) k->config_file.data);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->max_reuse != NGX_CONF_UNSET) {
        knob = "wasmpool_max_instance_reuse_count";
        wr = wasmpool_config_set_max_instance_reuse_count(cfg,
                                                     (uint32_t) k->max_reuse);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->max_concurrent_reuse != NGX_CONF_UNSET) {
        knob = "wasmpool_max_instance_concurrent_reuse_count";
        wr = wasmpool_config_set_max_instance_concurrent_reuse_count(cfg,
                                          (uint32_t) k->max_concurrent_reuse);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->request_timeout != NGX_CONF_UNSET_MSEC) {
        knob = "wasmpool_request_timeout";
        wr = wasmpool_config_set_request_timeout_ms(cfg,
                                               (uint64_t) k->request_timeout);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->max_concurrent_requests != NGX_CONF_UNSET) {
        knob = "wasmpool_max_concurrent_requests";
        wr = wasmpool_config_set_max_concurrent_requests(cfg,
                                       (uint32_t) k->max_concurrent_requests);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->max_queued_requests != NGX_CONF_UNSET) {
        knob = "wasmpool_max_queued_requests";
        wr = wasmpool_config_set_max_queued_requests(cfg,
                                           (uint32_t) k->max_queued_requests);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->cache_dir.len) {
        knob = "wasmpool_cache_dir";
        wr = wasmpool_config_set_cache_dir(cfg, (char *) k->cache_dir.data);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->memory_budget != NGX_CONF_UNSET) {
        knob = "wasmpool_memory_budget";
        wr = wasmpool_config_set_memory_budget(cfg,
                                              (uint64_t) k->memory_budget);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    if (k->engine_threads != NGX_CONF_UNSET) {
        knob = "wasmpool_engine_threads";
        wr = wasmpool_config_set_engine_threads(cfg,
                                               (uint32_t) k->engine_threads);
        if (wr != WASMPOOL_OK) {
            goto failed;
        }
    }

    return NGX_OK;

failed:

    if (cf) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid %s: %s: %s",
                           knob, wasmpool_result_str(wr),
                           wasmpool_last_error());
    } else {
        ngx_log_error(NGX_LOG_EMERG, log, 0, "wasmpool: invalid %s: %s: %s",
                      knob, wasmpool_result_str(wr), wasmpool_last_error());
    }

    return NGX_ERROR;
}


static void
ngx_http_wasmpool_free_config(void *data)
{
    wasmpool_config_free(data);
}


/*
 * Each component is loaded once while nginx reads its configuration
 * (nginx -t, start, reload): in a child process of the process that reads
 * it, so that the master itself never runs libwasmpool's threads. A file
 * that is not a component, or a component that does not link, fails the
 * configuration with the reason (a reload then keeps the old one), and
 * the compile cache is filled once for all workers. The child runs as the
 * workers' user, so what it writes to the cache is theirs.
 */

static ngx_int_t
ngx_http_wasmpool_postconfiguration(ngx_conf_t *cf)
{
    ngx_uint_t                      i;
    ngx_http_wasmpool_component_t **wcp;
    ngx_http_wasmpool_main_conf_t  *wmcf;

    if (ngx_process == NGX_PROCESS_SIGNALLER) {
        return NGX_OK;
    }

    wmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_wasmpool_module);

    wcp = wmcf->components.elts;

    for (i = 0; i < wmcf->components.nelts; i++) {
        if (ngx_http_wasmpool_check_component(cf, wcp[i]) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_wasmpool_check_child(ngx_conf_t *cf,
    ngx_http_wasmpool_component_t *wc, int fd)
{
    int                 n;
    char                msg[1024];
    uid_t               uid;
    gid_t               gid;
    const char         *name;
    struct group       *grp;
    struct passwd      *pwd;
    ngx_core_conf_t    *ccf;
    wasmpool_result     wr;
    wasmpool_handler   *h;

    if (geteuid() == 0) {
        ccf = (ngx_core_conf_t *) ngx_get_conf(cf->cycle->conf_ctx,
                                               ngx_core_module);

        if (ccf->user != (ngx_uid_t) NGX_CONF_UNSET_UINT) {
            uid = ccf->user;
            gid = ccf->group;
            name = ccf->username;

        } else {
            /* no "user" before "http": nginx's default, as its core does */
#ifdef NGX_USER
            name = NGX_USER;
#else
            name = "nobody";
#endif
            pwd = getpwnam(name);
#ifdef NGX_GROUP
            grp = getgrnam(NGX_GROUP);
#else
            grp = getgrnam("nogroup");
#endif
            if (pwd == NULL) {
                n = snprintf(msg, sizeof(msg),
                             "cannot find the workers' user \"%s\"", name);
                goto done;
            }

            uid = pwd->pw_uid;
            gid = grp ? grp->gr_gid : pwd->pw_gid;
        }

        if (setgid(gid) == -1 || initgroups(name, gid) == -1
            || setuid(uid) == -1)
        {
            n = snprintf(msg, sizeof(msg),
                         "cannot switch to the workers' user \"%s\": %s",
                         name, strerror(errno));
            goto done;
        }
    }

    if (ngx_http_wasmpool_host_settings(wc->cfg, &wc->knobs, 1) != NGX_OK) {
        n = snprintf(msg, sizeof(msg), "%s", wasmpool_last_error());
        goto done;
    }

    wr = wasmpool_handler_new(wc->cfg, (char *) wc->path.data, &h);

    if (wr == WASMPOOL_OK) {
        (void) wasmpool_handler_free(h);
        n = snprintf(msg, sizeof(msg), "ok");

    } else {
        n = snprintf(msg, sizeof(msg), "%s: %s", wasmpool_result_str(wr),
                     wasmpool_last_error());
    }

done:

    if (n > 0 && write(fd, msg, ngx_min((size_t) n, sizeof(msg) - 1)) == -1) {
        /* the parent reports a check that said nothing */
    }

    _exit(0);
}


static ngx_int_t
ngx_http_wasmpool_check_component(ngx_conf_t *cf,
    ngx_http_wasmpool_component_t *wc)
{
    int            fds[2], rc, status;
    char           msg[1024];
    size_t         len;
    pid_t          pid;
    ssize_t        n;
    ngx_msec_t     start, left;
    struct pollfd  pfd;

    if (pipe(fds) == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "wasmpool: pipe() failed");
        return NGX_ERROR;
    }

    pid = fork();

    if (pid == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "wasmpool: fork() failed");
        close(fds[0]);
        close(fds[1]);
        return NGX_ERROR;
    }

    if (pid == 0) {
        close(fds[0]);
        ngx_http_wasmpool_check_child(cf, wc, fds[1]);
    }

    close(fds[1]);

    len = 0;
    ngx_time_update();
    start = ngx_current_msec;

    for ( ;; ) {
        ngx_time_update();
        left = NGX_HTTP_WASMPOOL_CHECK_TIMEOUT
               - ngx_min(ngx_current_msec - start,
                         NGX_HTTP_WASMPOOL_CHECK_TIMEOUT);

        if (left == 0) {
            (void) kill(pid, SIGKILL);
            len = snprintf(msg, sizeof(msg),
                           "loading took longer than %d s",
                           NGX_HTTP_WASMPOOL_CHECK_TIMEOUT / 1000);
            break;
        }

        pfd.fd = fds[0];
        pfd.events = POLLIN;
        pfd.revents = 0;

        rc = poll(&pfd, 1, (int) left);

        if (rc == -1 && errno == EINTR) {
            continue;
        }

        if (rc <= 0) {
            continue;
        }

        n = read(fds[0], msg + len, sizeof(msg) - 1 - len);

        if (n == -1 && errno == EINTR) {
            continue;
        }

        if (n <= 0) {
            break;
        }

        len += n;

        if (len == sizeof(msg) - 1) {
            break;
        }
    }

    close(fds[0]);

    while (waitpid(pid, &status, 0) == -1 && errno == EINTR) {
        /* void */
    }

    msg[len] = '\0';

    if (len == 2 && msg[0] == 'o' && msg[1] == 'k') {
        return NGX_OK;
    }

    if (len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "wasmpool: loading component \"%V\" crashed",
                           &wc->path);

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "wasmpool: component \"%V\" does not load: %s",
                           &wc->path, msg);
    }

    return NGX_ERROR;
}


/* worker processes */


/*
 * A connection that watches "fd" for reading (edge-triggered under
 * epoll: "handler" must read until the fd is empty), or NULL. The fd stays
 * the caller's: on failure it is not closed.
 */

static ngx_connection_t *
ngx_http_wasmpool_watch(ngx_cycle_t *cycle, ngx_fd_t fd,
    ngx_event_handler_pt handler, void *data)
{
    ngx_int_t          flags;
    ngx_connection_t  *c;

    c = ngx_get_connection(fd, cycle->log);
    if (c == NULL) {
        return NULL;
    }

    c->data = data;
    c->log = cycle->log;
    c->read->log = cycle->log;
    c->write->log = cycle->log;
    c->read->handler = handler;

    flags = (ngx_event_flags & NGX_USE_CLEAR_EVENT) ? NGX_CLEAR_EVENT
                                                     : NGX_LEVEL_EVENT;

    if (ngx_add_event(c->read, NGX_READ_EVENT, flags) != NGX_OK) {
        ngx_free_connection(c);
        return NULL;
    }

    return c;
}


/*
 * The settings every handler of the module runs with, on top of the
 * knobs: callbacks on the polling thread only; nginx's
 * client_max_body_size is the limit of request bodies, not libwasmpool's
 * own; and unless wasmpool_memory_budget says per_worker, each of the
 * workers takes its share of the budget.
 */

static ngx_int_t
ngx_http_wasmpool_host_settings(wasmpool_config *cfg,
    ngx_http_wasmpool_knobs_t *k, ngx_uint_t workers)
{
    /*
     * Callbacks run in the event loop; requests start on the worker's
     * thread too unless "wasmpool_inline off" (see the header).
     */

    if (wasmpool_config_set_completion_mode(cfg, WASMPOOL_COMPLETION_POLL)
        != WASMPOOL_OK
        || wasmpool_config_set_inline(cfg, k->inline_run != 0) != WASMPOOL_OK
        || wasmpool_config_set_max_request_body_size(cfg, UINT64_MAX)
           != WASMPOOL_OK
        || wasmpool_config_set_memory_budget_share(cfg,
               (k->memory_budget_per_worker == 1) ? 1 : (uint32_t) workers)
           != WASMPOOL_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_wasmpool_start_component(ngx_cycle_t *cycle,
    ngx_http_wasmpool_component_t *wc, ngx_uint_t workers)
{
    int                 fd;
    wasmpool_result     wr;

    /* wc->cfg is this process's copy of the master's: ours to change */

    if (ngx_http_wasmpool_host_settings(wc->cfg, &wc->knobs, workers)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "wasmpool: %s",
                      wasmpool_last_error());
        return NGX_ERROR;
    }

    wr = wasmpool_handler_new(wc->cfg, (char *) wc->path.data, &wc->handler);

    if (wr != WASMPOOL_OK) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "wasmpool: cannot load component \"%V\": %s: %s",
                      &wc->path, wasmpool_result_str(wr),
                      wasmpool_last_error());
        wc->handler = NULL;
        return NGX_ERROR;
    }

    /* watch the completion fd (owned by the handler: never closed here) */

    fd = wasmpool_handler_completion_fd(wc->handler);

    wc->conn = ngx_http_wasmpool_watch(cycle, fd,
                                       ngx_http_wasmpool_completion_handler,
                                       wc);
    if (wc->conn == NULL) {
        goto failed;
    }

    ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                  "wasmpool: component \"%V\" loaded", &wc->path);

    return NGX_OK;

failed:

    ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                  "wasmpool: cannot watch the completion fd of \"%V\"",
                  &wc->path);

    (void) wasmpool_handler_free(wc->handler);
    wc->handler = NULL;

    return NGX_ERROR;
}


static ngx_int_t
ngx_http_wasmpool_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                      i, workers;
    ngx_core_conf_t                *ccf;
    ngx_http_wasmpool_component_t **wcp;
    ngx_http_wasmpool_main_conf_t  *wmcf;

    /* workers only: not the cache manager and loader */

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    wmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_wasmpool_module);
    if (wmcf == NULL) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    workers = (ccf && ccf->worker_processes > 1)
              ? (ngx_uint_t) ccf->worker_processes : 1;

    ngx_http_wasmpool_exiting = 0;

    if (wmcf->components.nelts) {
        ngx_http_wasmpool_start_log(cycle);
    }

    wcp = wmcf->components.elts;

    for (i = 0; i < wmcf->components.nelts; i++) {
        ngx_queue_init(&wcp[i]->live);
        wcp[i]->nlive = 0;
        wcp[i]->handler = NULL;
        wcp[i]->conn = NULL;

        /*
         * A component that does not load leaves its locations answering
         * 500 (logged) instead of taking the worker down.
         */

        (void) ngx_http_wasmpool_start_component(cycle, wcp[i], workers);
    }

    return NGX_OK;
}


static void
ngx_http_wasmpool_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                      i;
    ngx_queue_t                    *q, *next;
    ngx_connection_t               *c;
    ngx_http_wasmpool_ctx_t        *ctx;
    ngx_http_wasmpool_component_t **wcp, *wc;
    ngx_http_wasmpool_main_conf_t  *wmcf;

    wmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_wasmpool_module);
    if (wmcf == NULL) {
        return;
    }

    /* callbacks from here on touch no request */

    ngx_http_wasmpool_exiting = 1;

    wcp = wmcf->components.elts;

    for (i = 0; i < wmcf->components.nelts; i++) {
        wc = wcp[i];

        if (wc->handler == NULL) {
            continue;
        }

        /* stop what still runs so that the handler need not wait for it */

        for (q = ngx_queue_head(&wc->live);
             q != ngx_queue_sentinel(&wc->live);
             q = next)
        {
            next = ngx_queue_next(q);
            ctx = ngx_queue_data(q, ngx_http_wasmpool_ctx_t, queue);
            ngx_http_wasmpool_stop(ctx);
        }

        c = wc->conn;

        if (c) {
            if (c->read->timer_set) {
                ngx_del_timer(c->read);
            }

            if (c->read->active) {
                (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
            }

            /* the fd is the handler's to close, not ours */

            ngx_free_connection(c);
            c->fd = (ngx_socket_t) -1;
            wc->conn = NULL;
        }

        /* runs the callbacks still due (they free what is left) */

        if (wasmpool_handler_free(wc->handler) != WASMPOOL_OK) {
            ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                          "wasmpool: wasmpool_handler_free() failed: %s",
                          wasmpool_last_error());
        }

        wc->handler = NULL;
    }

    /* the handlers are gone: nothing logs any more */

    ngx_http_wasmpool_stop_log();
}


/* libwasmpool's log */


static void
ngx_http_wasmpool_on_log(void *data, wasmpool_log_level level, bool guest,
    const uint8_t *msg, size_t len)
{
    u_char  rec[PIPE_BUF];

    /* any thread: no nginx call here, one write(2) of <= PIPE_BUF bytes */

    if (ngx_http_wasmpool_log_wfd == -1) {
        return;
    }

    len = ngx_min(len, sizeof(rec) - 3);

    rec[0] = (u_char) ('0' + level);
    rec[1] = guest ? 'g' : 'l';
    ngx_memcpy(&rec[2], msg, len);
    rec[len + 2] = '\n';

    /* a full pipe (the worker is busy for long) drops the record */

    if (write(ngx_http_wasmpool_log_wfd, rec, len + 3) == -1) {
        return;
    }
}


static void
ngx_http_wasmpool_log_record(ngx_log_t *log, u_char *p, size_t n)
{
    ngx_uint_t  level;

    if (n < 2) {
        return;
    }

    if (p[1] == 'g') {
        /* what a guest wrote to stdout or stderr */
        ngx_log_error(NGX_LOG_INFO, log, 0, "wasmpool: %*s",
                      (size_t) (n - 2), p + 2);
        return;
    }

    switch (p[0]) {
    case '1':
        level = NGX_LOG_ERR;
        break;
    case '2':
        level = NGX_LOG_WARN;
        break;
    case '3':
        level = NGX_LOG_INFO;
        break;
    default:
        level = NGX_LOG_DEBUG;
        break;
    }

    ngx_log_error(level, log, 0, "wasmpool: %*s", (size_t) (n - 2), p + 2);
}


static void
ngx_http_wasmpool_log_handler(ngx_event_t *rev)
{
    u_char            *p, *end, *nl;
    ssize_t            n;
    ngx_connection_t  *c;

    c = rev->data;

    /* edge-triggered: read until the pipe is empty */

    for ( ;; ) {
        n = read(c->fd, ngx_http_wasmpool_log_buf + ngx_http_wasmpool_log_len,
                 sizeof(ngx_http_wasmpool_log_buf) - ngx_http_wasmpool_log_len);

        if (n == -1 && ngx_errno == NGX_EINTR) {
            continue;
        }

        if (n <= 0) {
            return;
        }

        ngx_http_wasmpool_log_len += n;

        p = ngx_http_wasmpool_log_buf;
        end = p + ngx_http_wasmpool_log_len;

        while (p < end) {
            nl = ngx_strlchr(p, end, '\n');
            if (nl == NULL) {
                break;
            }

            ngx_http_wasmpool_log_record(c->log, p, nl - p);
            p = nl + 1;
        }

        /* keep a record the read cut in two */

        ngx_http_wasmpool_log_len = end - p;
        ngx_memmove(ngx_http_wasmpool_log_buf, p, ngx_http_wasmpool_log_len);
    }
}


static void
ngx_http_wasmpool_start_log(ngx_cycle_t *cycle)
{
    int                fds[2];
    ngx_uint_t         level;
    wasmpool_result    wr;
    ngx_connection_t  *c;

    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) == -1) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                      "wasmpool: pipe2() for the log failed");
        return;
    }

    c = ngx_http_wasmpool_watch(cycle, fds[0], ngx_http_wasmpool_log_handler,
                                NULL);
    if (c == NULL) {
        close(fds[0]);
        close(fds[1]);
        return;
    }

    ngx_http_wasmpool_log_conn = c;
    ngx_http_wasmpool_log_wfd = fds[1];
    ngx_http_wasmpool_log_len = 0;

    level = cycle->log->log_level;

    wr = wasmpool_set_logger(ngx_http_wasmpool_on_log, NULL,
                             (level >= NGX_LOG_DEBUG) ? WASMPOOL_LOG_DEBUG
                             : (level >= NGX_LOG_INFO) ? WASMPOOL_LOG_INFO
                             : WASMPOOL_LOG_WARN);
    if (wr != WASMPOOL_OK) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "wasmpool: its log is not in the error log: %s",
                      wasmpool_last_error());
    }
}


static void
ngx_http_wasmpool_stop_log(void)
{
    int  fd;

    (void) wasmpool_set_logger(NULL, NULL, WASMPOOL_LOG_INFO);

    if (ngx_http_wasmpool_log_conn == NULL) {
        return;
    }

    /* what is in the pipe still goes to the log */

    ngx_http_wasmpool_log_handler(ngx_http_wasmpool_log_conn->read);

    fd = ngx_http_wasmpool_log_wfd;
    ngx_http_wasmpool_log_wfd = -1;

    ngx_close_connection(ngx_http_wasmpool_log_conn);
    ngx_http_wasmpool_log_conn = NULL;

    if (fd != -1) {
        close(fd);
    }
}
