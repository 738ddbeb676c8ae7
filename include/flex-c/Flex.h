/*===- Flex.h - The C API of the Flex runtime ---------------------*- C -*-===*\
|*                                                                            *|
|* Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.   *|
|*                                                                            *|
\*===----------------------------------------------------------------------===*/
/*
 * This file declares the C API for embedding Flex (PyTorch, other runtimes):
 * load a plan, query its layer, arguments and workspace, and run forward and
 * backward on caller-owned buffers given as (name, pointer, size) arrays.
 * docs/CAPI.md describes the rules; the short form:
 *
 *  - Every function returns a FlexStatus. On failure, flexGetLastError()
 *    gives the message of the failed call on this thread; calls on an
 *    executable also store it there (flexExecutableGetLastError).
 *  - Handles are opaque. Destroying a handle twice, or passing a destroyed
 *    handle, is detected and returns FLEX_STATUS_INVALID_ARGUMENT (the
 *    runtime keeps a registry of live handles).
 *  - One executable is not thread-safe: call it from one thread at a time.
 *    Distinct executables may run concurrently.
 *  - Strings the API returns stay valid until the handle is destroyed (or,
 *    for flexGetLastError, until the next failing call on the thread).
 *  - Compiling (flexCompileLayer) needs the MLIR compiler, which lives in a
 *    separate library that registers itself with flexSetCompiler(); without
 *    it the call returns FLEX_STATUS_UNAVAILABLE.
\*===----------------------------------------------------------------------===*/

#ifndef FLEX_C_FLEX_H
#define FLEX_C_FLEX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this header. flexGetVersion() returns the library's; a
 * caller checks they agree. Raised on any incompatible change. */
#define FLEX_C_API_VERSION 1

/* Numbering matches flex::StatusCode. */
typedef enum FlexStatus {
  FLEX_STATUS_OK = 0,
  FLEX_STATUS_INVALID_ARGUMENT = 1,     /* a value the call does not allow */
  FLEX_STATUS_NOT_FOUND = 2,            /* unknown argument or variant name */
  FLEX_STATUS_OUT_OF_RANGE = 3,         /* index out of range */
  FLEX_STATUS_FAILED_PRECONDITION = 4,  /* e.g. backward before forward */
  FLEX_STATUS_UNAVAILABLE = 5,          /* not built or linked in */
  FLEX_STATUS_NUMERIC_ERROR = 6,        /* NaN/Inf found by a requested check */
  FLEX_STATUS_IO_ERROR = 7,             /* a file could not be read */
  FLEX_STATUS_INVALID_PLAN = 8,         /* the plan document is rejected */
  FLEX_STATUS_INTERNAL = 9,             /* a bug in Flex */
  FLEX_STATUS_COMMUNICATION_ERROR = 10, /* a collective failed or timed out */
} FlexStatus;

/* Numbering matches flex::DType. */
typedef enum FlexDType {
  FLEX_DTYPE_F32 = 0,
  FLEX_DTYPE_BF16 = 1,
  FLEX_DTYPE_F16 = 2,
  FLEX_DTYPE_I32 = 3,
} FlexDType;

typedef enum FlexArgumentRole {
  FLEX_ROLE_INPUT = 0,       /* read, never written */
  FLEX_ROLE_OUTPUT = 1,      /* written by forward */
  FLEX_ROLE_GRAD_INPUT = 2,  /* read by backward */
  FLEX_ROLE_GRAD_OUTPUT = 3, /* written by backward */
} FlexArgumentRole;

typedef enum FlexCapacityMode {
  FLEX_CAPACITY_FIXED = 0,
  FLEX_CAPACITY_DROPLESS = 1,
  FLEX_CAPACITY_BOUNDED = 2,
} FlexCapacityMode;

typedef enum FlexExpertKind {
  FLEX_EXPERT_FFN = 0,
  FLEX_EXPERT_GATED = 1,
} FlexExpertKind;

typedef enum FlexActivation {
  FLEX_ACTIVATION_RELU = 0,
  FLEX_ACTIVATION_GELU = 1,
  FLEX_ACTIVATION_SILU = 2,
} FlexActivation;

/* flex::LayerConfig; see docs/PlanFormat.md for the fields. */
typedef struct FlexLayerConfig {
  int64_t tokens;
  int64_t model_dim;
  int64_t hidden_dim;
  int64_t experts;
  int64_t top_k;
  int32_t capacity_mode; /* FlexCapacityMode */
  int32_t expert_kind;   /* FlexExpertKind */
  double capacity_factor;
  int32_t activation;    /* FlexActivation */
  int32_t dtype;         /* FlexDType */
  int32_t bias;          /* 0 or 1 */
  int32_t router_fp32;
  int32_t batch_prioritized;
  int32_t normalize_gate;
  double gate_noise;
  uint64_t seed;
} FlexLayerConfig;

#define FLEX_MAX_RANK 8

typedef struct FlexArgumentInfo {
  const char *name; /* valid while the executable lives */
  int32_t dtype;    /* FlexDType */
  int32_t role;     /* FlexArgumentRole */
  int32_t rank;
  int64_t shape[FLEX_MAX_RANK]; /* row-major; entries past rank are 0 */
  int64_t bytes;                /* the exact size a binding must give */
} FlexArgumentInfo;

/* One caller buffer: host memory for the CPU backend, device memory
 * (cudaMalloc, or a framework's device tensor) of the executable's device for
 * the CUDA backend. `bytes` must equal the argument's size exactly. */
typedef struct FlexBinding {
  const char *name;
  void *data;
  int64_t bytes;
} FlexBinding;

/* Flags of FlexRunOptions. */
#define FLEX_RUN_CHECK_NONFINITE 0x1u /* NaN/Inf check of inputs and outputs */
#define FLEX_RUN_NO_TIMING 0x2u       /* skip per-step timing; on CUDA the
                                         call then returns without waiting */
#define FLEX_RUN_CUDA_GRAPH 0x4u /* CUDA: record the pass as a graph and
                                    replay it (fixed capacity, padded layout;
                                    other plans run step by step) */
/* Forward: the gate noise uses FlexRunOptions::seed instead of the plan's
 * (FlexLayerConfig::seed). */
#define FLEX_RUN_SEED 0x8u

/* The fields a caller sets are those below its struct_size: a caller built
 * with an older header (struct_size 16, up to `stream`) gets the behaviour
 * of that header. docs/CAPI.md, "Per-call workspaces and seeds". */
typedef struct FlexRunOptions {
  uint32_t struct_size; /* sizeof(FlexRunOptions), for later extension */
  uint32_t flags;       /* FLEX_RUN_* */
  void *stream;         /* cudaStream_t for CUDA (NULL = the executable's own
                           stream, which waits for the legacy default
                           stream); must be NULL on CPU */
  /* The workspace of this call (NULL = the executable's own): at least
   * flexExecutableGetWorkspaceSize's bytes, aligned to its alignment, in the
   * backend's memory. A forward's saved state lives there; the backward
   * given the same workspace computes the gradients of that forward, what-
   * ever ran on other workspaces in between. Keep it alive and unwritten
   * until that backward. */
  void *workspace;
  int64_t workspace_bytes;
  /* The gate-noise seed of a forward with FLEX_RUN_SEED; its backward uses
   * the same noise. Ignored by a backward. */
  uint64_t seed;
} FlexRunOptions;

typedef struct FlexContextImpl *FlexContext;
typedef struct FlexExecutableImpl *FlexExecutable;
typedef struct FlexCommunicatorImpl *FlexCommunicator;
typedef struct FlexOptionsImpl *FlexOptions;

/*===--------------------------------------------------------------------===*
 * Version and errors
 *===--------------------------------------------------------------------===*/

/* FLEX_C_API_VERSION of the library. */
uint32_t flexGetVersion(void);
/* sizeof(FlexRunOptions) of the library: the fields it reads. A library
 * older than a caller's header ignores the fields past its size (workspace,
 * workspace_bytes, seed need >= 40), so a caller checks this before relying
 * on them. */
uint32_t flexGetRunOptionsSize(void);
/* "flex <major.minor> (C API <n>)". */
const char *flexGetVersionString(void);
/* "FLEX_STATUS_OK", ... ; "FLEX_STATUS_<unknown>" for other values. */
const char *flexStatusName(FlexStatus status);
/* The message of the last failed call on this thread ("" when none). */
const char *flexGetLastError(void);

/*===--------------------------------------------------------------------===*
 * Runtime options (docs/Runtime.md, "Runtime options")
 *===--------------------------------------------------------------------===*/

/* clang-format off */
/* The behaviour knobs of the runtime, set by name with the text their
 * environment variable takes, e.g. flexOptionsSet(opts, "variant", "r1d2"):
 *   variant               FLEX_VARIANT               name or index ("" = plan's)
 *   check_nonfinite       FLEX_CHECK_NAN             1 / 0
 *   cuda_graph            FLEX_CUDA_GRAPH            1 / 0
 *   cuda_overlap          FLEX_CUDA_OVERLAP          1 / 0 (default 1)
 *   a2a_staging           FLEX_A2A_STAGING           auto / always / never
 *   a2a_transport         FLEX_A2A_TRANSPORT         nccl / ce
 *   collective_timeout_s  FLEX_COLLECTIVE_TIMEOUT_S  seconds > 0 (300)
 *   profile               FLEX_PROFILE               device profile path
 *   refine_variant        FLEX_REFINE_VARIANT        1 / 0 (default 1)
 *   grouped_gemm          FLEX_GROUPED_GEMM          auto / device / cublas
 *   relu_in_gemm          FLEX_RELU_IN_GEMM          1 / 0 (default 1)
 *   wgmma                 FLEX_WGMMA                 1 / 0 (default 1)
 *   wgmma_tile            FLEX_WGMMA_TILE            auto / wide / pair /
 *                                                    cooperative / ping-pong
 *   gemm_streams          FLEX_GEMM_STREAMS          1..8 (default 2)
 *   max_workspace_mib     FLEX_MAX_WORKSPACE_MIB     MiB the own workspace
 *                                                    grows to (default 0: any)
 * Booleans also take true/false, on/off, yes/no. An object is passed where a
 * context or communicator is created and copied there; the environment
 * variables, when set and non-empty, override it when an executable or a
 * communicator is created. A bad value is FLEX_STATUS_INVALID_ARGUMENT
 * naming the option (or the variable) and the allowed values; an unknown
 * name is FLEX_STATUS_NOT_FOUND, so new options never change this ABI. */
/* clang-format on */
FlexStatus flexOptionsCreate(FlexOptions *options); /* every default */
FlexStatus flexOptionsDestroy(FlexOptions options);
FlexStatus flexOptionsSet(FlexOptions options, const char *name,
                          const char *value);
/* The text form of option `name` as set (not the environment's); *value
 * stays valid until the next call on `options`. */
FlexStatus flexOptionsGet(FlexOptions options, const char *name,
                          const char **value);

/*===--------------------------------------------------------------------===*
 * Context: the backend executables run on, and their runtime options.
 *===--------------------------------------------------------------------===*/

/* `backend` is "cpu" (or NULL for the default, "cpu") or "cuda" (the
 * current CUDA device of the calling thread; FLEX_STATUS_UNAVAILABLE when
 * this build has no CUDA backend or no device is visible). */
FlexStatus flexContextCreate(const char *backend, FlexContext *context);
/* The same with runtime options (NULL = the defaults, as flexContextCreate):
 * each executable of the context runs with them, the environment's
 * overrides applied when it is created. */
FlexStatus flexContextCreateWithOptions(const char *backend,
                                        FlexOptions options,
                                        FlexContext *context);
FlexStatus flexContextDestroy(FlexContext context);

/*===--------------------------------------------------------------------===*
 * Executables
 *===--------------------------------------------------------------------===*/

/* Loads a plan from JSON text of `length` bytes (not NUL-terminated is ok).
 * The context's "variant" option, or the FLEX_VARIANT environment variable
 * over it, selects the initial variant (name or index) and an unknown one
 * fails the call. */
FlexStatus flexExecutableCreateFromPlan(FlexContext context, const char *text,
                                        size_t length,
                                        FlexExecutable *executable);
FlexStatus flexExecutableCreateFromPlanFile(FlexContext context,
                                            const char *path,
                                            FlexExecutable *executable);
FlexStatus flexExecutableDestroy(FlexExecutable executable);
/* The message of the last failed call on this executable ("" when none). */
const char *flexExecutableGetLastError(FlexExecutable executable);

FlexStatus flexExecutableGetLayerConfig(FlexExecutable executable,
                                        FlexLayerConfig *config);
/* 1 when the plan has backward steps, else 0. */
FlexStatus flexExecutableIsTraining(FlexExecutable executable,
                                    int32_t *training);
FlexStatus flexExecutableGetNumArguments(FlexExecutable executable,
                                         int64_t *count);
FlexStatus flexExecutableGetArgument(FlexExecutable executable, int64_t index,
                                     FlexArgumentInfo *info);
/* Index of the argument `name`, or FLEX_STATUS_NOT_FOUND. */
FlexStatus flexExecutableFindArgument(FlexExecutable executable,
                                      const char *name, int64_t *index);
/* A workspace of `bytes` runs every variant; each variant needs only its
 * own part (flexExecutableGetVariantWorkspaceSize). */
FlexStatus flexExecutableGetWorkspaceSize(FlexExecutable executable,
                                          int64_t *bytes, int64_t *alignment);
/* The workspace bytes variant `index` runs on. A smaller workspace than
 * flexExecutableGetWorkspaceSize's runs the variants that fit in it; auto
 * picks among those, and a named variant that does not fit is an error. */
FlexStatus flexExecutableGetVariantWorkspaceSize(FlexExecutable executable,
                                                 int64_t index, int64_t *bytes);
/* The workspace bytes the next calls may need: the selected variant's when
 * one is named, else the largest variant within the option
 * max_workspace_mib (every variant without it). A caller allocating a
 * workspace per call allocates this. */
FlexStatus flexExecutableGetRunWorkspaceSize(FlexExecutable executable,
                                             int64_t *bytes);
/* Use the caller's workspace (>= the smallest variant's size, aligned; the
 * variants that fit run on it); NULL goes back to one the runtime allocates
 * at the first run and grows to the variants run on it. */
FlexStatus flexExecutableSetWorkspace(FlexExecutable executable, void *data,
                                      int64_t bytes);

/* Variants: ways to run the same layer; any may run on the same buffers. */
FlexStatus flexExecutableGetNumVariants(FlexExecutable executable,
                                        int64_t *count);
FlexStatus flexExecutableGetVariantName(FlexExecutable executable,
                                        int64_t index, const char **name);
FlexStatus flexExecutableSelectVariant(FlexExecutable executable,
                                       int64_t index);
FlexStatus flexExecutableSelectVariantByName(FlexExecutable executable,
                                             const char *name);
FlexStatus flexExecutableGetSelectedVariant(FlexExecutable executable,
                                            int64_t *index);
/* The cost model's account of the variant choice as JSON (docs/CostModel.md,
 * "Explain"): per variant the predicted per-stage and total microseconds,
 * the measured means of the timed runs and the error, which variant was
 * chosen and why, and the device profile's source. The name "auto" given to
 * flexExecutableSelectVariantByName (or the option variant=auto) turns the
 * automatic choice on. *json is malloc'ed; free it with flexFreeString. */
FlexStatus flexExecutableExplain(FlexExecutable executable, char **json);

/* Forward: binds every input and output argument (others may be passed).
 * `options` may be NULL (no checks, timing on, the executable's workspace,
 * the plan's seed). */
FlexStatus flexExecutableForward(FlexExecutable executable,
                                 const FlexBinding *bindings, int64_t count,
                                 const FlexRunOptions *options);
/* Backward of the last forward on the same workspace (options->workspace,
 * or the executable's own when NULL or not given), with that forward's
 * variant and seed, on the same inputs: binds every input, grad_input and
 * grad_output argument. Without a forward pending on that workspace (none
 * ran, it failed, or its backward ran already):
 * FLEX_STATUS_FAILED_PRECONDITION. */
FlexStatus flexExecutableBackward(FlexExecutable executable,
                                  const FlexBinding *bindings, int64_t count,
                                  const FlexRunOptions *options);

/* Per-step times of the last successful run (microseconds). `op` is the
 * plan step op name. */
FlexStatus flexExecutableGetNumStepTimings(FlexExecutable executable,
                                           int64_t *count);
FlexStatus flexExecutableGetStepTiming(FlexExecutable executable,
                                       int64_t index, const char **op,
                                       double *micros);
FlexStatus flexExecutableGetLastRunMicros(FlexExecutable executable,
                                          double *micros);
/* Whether the last successful run replayed a recorded CUDA graph
 * (FLEX_RUN_CUDA_GRAPH on a pass the backend can record, docs/Runtime.md):
 * 1, or 0 when it ran step by step (the first eager and the recording calls
 * included). */
FlexStatus flexExecutableGetLastRunReplayedGraph(FlexExecutable executable,
                                                 int *replayed);

/*===--------------------------------------------------------------------===*
 * Many ranks (docs/Runtime.md, "Many ranks")
 *===--------------------------------------------------------------------===*/

/* A plan for W ranks (`world.size`) runs on every rank with a communicator
 * of W ranks; its collective steps run through it. Collectives wait at most
 * the collective timeout (option collective_timeout_s, or
 * FLEX_COLLECTIVE_TIMEOUT_S; default 300 s); a timeout or transport
 * error fails the call with FLEX_STATUS_COMMUNICATION_ERROR naming the step
 * and the ranks, after the MPI communicator has printed it and called
 * MPI_Abort (a failed collective leaves MPI unusable). */

/* 1 when this build has the MPI communicator, else 0. */
int32_t flexHasMpi(void);
/* A communicator over a duplicate of the MPI communicator at `mpi_comm` (the
 * address of an MPI_Comm; NULL = MPI_COMM_WORLD). MPI must be initialized
 * by the caller (FLEX_STATUS_FAILED_PRECONDITION otherwise);
 * FLEX_STATUS_UNAVAILABLE when this build has no MPI. */
FlexStatus flexCommunicatorCreateMpi(const void *mpi_comm,
                                     FlexCommunicator *communicator);
/* 1 when this build has the NCCL communicator (CUDA backend and NCCL >=
 * 2.14 found), else 0. The NCCL communicator is for executables of the
 * "cuda" context: its collectives move device memory on the executable's
 * stream, one GPU per rank. Every wait (joining, each collective, the
 * stream) is bounded by the collective timeout; on a timeout or an NCCL
 * error it aborts the NCCL communicator and the run fails with
 * FLEX_STATUS_COMMUNICATION_ERROR. `device` is the rank's GPU (-1 = the
 * calling thread's current device); FLEX_STATUS_UNAVAILABLE without NCCL. */
int32_t flexHasNccl(void);
/* Over the ranks of the MPI communicator at `mpi_comm` (NULL =
 * MPI_COMM_WORLD; MPI initialized by the caller): rank 0 makes the NCCL id
 * and MPI broadcasts it. */
FlexStatus flexCommunicatorCreateNcclFromMpi(const void *mpi_comm,
                                             int32_t device,
                                             FlexCommunicator *communicator);
/* From a torchrun-style environment: RANK, WORLD_SIZE, MASTER_ADDR and
 * MASTER_PORT (FLEX_RENDEZVOUS_PORT overrides the port; under torchrun,
 * whose own store holds MASTER_PORT, MASTER_PORT + 1 is used). Rank 0
 * listens there and sends the NCCL id to the others over TCP. */
FlexStatus flexCommunicatorCreateNcclFromEnv(int32_t device,
                                             FlexCommunicator *communicator);
/* From an id the caller shares (e.g. with torch.distributed): rank 0 calls
 * flexNcclGetUniqueId, every rank passes those 128 bytes. */
FlexStatus flexNcclGetUniqueId(char id[128]);
FlexStatus flexCommunicatorCreateNccl(const char id[128], int32_t rank,
                                      int32_t size, int32_t device,
                                      FlexCommunicator *communicator);
/* The four creations above with runtime options (NULL = the defaults, as
 * the functions without options): the communicator takes
 * collective_timeout_s and, for NCCL, a2a_transport (rank 0's holds for
 * every rank), the environment's overrides applied. */
FlexStatus flexCommunicatorCreateMpiWithOptions(const void *mpi_comm,
                                                FlexOptions options,
                                                FlexCommunicator *communicator);
FlexStatus flexCommunicatorCreateNcclFromMpiWithOptions(
    const void *mpi_comm, int32_t device, FlexOptions options,
    FlexCommunicator *communicator);
FlexStatus flexCommunicatorCreateNcclFromEnvWithOptions(
    int32_t device, FlexOptions options, FlexCommunicator *communicator);
FlexStatus flexCommunicatorCreateNcclWithOptions(
    const char id[128], int32_t rank, int32_t size, int32_t device,
    FlexOptions options, FlexCommunicator *communicator);
/* A host-memory communicator (for executables of the "cpu" context) whose
 * collectives the caller implements: a framework's own process group
 * (flexmoe runs CPU ranks through torch.distributed over gloo this way) or
 * any transport. Every function is required except `destroy`; each returns
 * 0 on success, anything else fails the collective step with
 * FLEX_STATUS_COMMUNICATION_ERROR naming it and the failure's text (the
 * function may write up to message_size bytes, NUL-terminated, into
 * `message`), and the communicator stays broken. They are called on the
 * thread that runs the executable, in the same order on every rank, with
 * Communicator.h's meanings:
 *   all_to_all: to each rank p send send_bytes[p] bytes at send +
 *     send_offsets[p]; from each p receive recv_bytes[p] bytes into recv +
 *     recv_offsets[p] (arrays of `size` entries; this rank's own included);
 *   all_gather: block p of recv (bytes at recv + p * bytes) = p's send;
 *   reduce_scatter_sum: recv[i] = sum over p of p's send[rank * count + i],
 *     `count` elements of `dtype` (F32, BF16, F16), summed in fp32;
 *   all_reduce_max_i32: values[i] = the largest over the ranks, in place;
 *   barrier.
 * `destroy(user)`, when given, runs once the communicator and every
 * executable using it are gone; a creation refused for its arguments
 * never calls it (the caller still owns `user`). There is no collective
 * timeout: the functions' transport bounds the waits. It cannot split: plans
 * with grouped collectives (experts sharded over ranks with r < s, 2DH) need
 * MPI or NCCL. */
typedef struct FlexCollectiveCallbacks {
  uint32_t struct_size; /* sizeof(FlexCollectiveCallbacks) */
  void *user;
  int32_t (*all_to_all)(void *user, const void *send,
                        const int64_t *send_offsets, const int64_t *send_bytes,
                        void *recv, const int64_t *recv_offsets,
                        const int64_t *recv_bytes, char *message,
                        int64_t message_size);
  int32_t (*all_gather)(void *user, const void *send, int64_t bytes, void *recv,
                        char *message, int64_t message_size);
  int32_t (*reduce_scatter_sum)(void *user, const void *send, void *recv,
                                int64_t count, int32_t dtype, char *message,
                                int64_t message_size);
  int32_t (*all_reduce_max_i32)(void *user, int32_t *values, int64_t count,
                                char *message, int64_t message_size);
  int32_t (*barrier)(void *user, char *message, int64_t message_size);
  void (*destroy)(void *user);
} FlexCollectiveCallbacks;
/* Rank `rank` of `size` over `callbacks` (copied; `user` is passed back
 * as is). `name` (may be NULL: "callbacks") names it in messages. */
FlexStatus
flexCommunicatorCreateCallbacks(const FlexCollectiveCallbacks *callbacks,
                                int32_t rank, int32_t size, const char *name,
                                FlexCommunicator *communicator);
FlexStatus flexCommunicatorDestroy(FlexCommunicator communicator);
/* This process's rank and the number of ranks (either may be NULL). */
FlexStatus flexCommunicatorGetRank(FlexCommunicator communicator, int32_t *rank,
                                   int32_t *size);
/* W, the ranks the plan runs on (1 for a one-rank plan). */
FlexStatus flexExecutableGetWorldSize(FlexExecutable executable,
                                      int32_t *world_size);
/* The communicator the executable's collective steps run through; its size
 * must be the plan's world size (FLEX_STATUS_INVALID_ARGUMENT otherwise).
 * The executable keeps it alive, so the handle may be destroyed after. NULL
 * goes back to the default: a one-rank communicator for a one-rank plan,
 * none for a multi-rank plan (whose runs then fail until one is set). */
FlexStatus flexExecutableSetCommunicator(FlexExecutable executable,
                                         FlexCommunicator communicator);

/*===--------------------------------------------------------------------===*
 * Compiling (needs the compiler library, FlexCompilerCAPI)
 *===--------------------------------------------------------------------===*/

typedef struct FlexCompileOptions {
  uint32_t struct_size; /* sizeof(FlexCompileOptions) */
  int32_t world_size;   /* W ranks; 0 or 1 = one rank */
  int32_t rank;
  int32_t training;     /* emit backward steps */
  const char *pipeline; /* extra compiler options text, may be NULL */
} FlexCompileOptions;

/* What the compiler library registers. Both functions return a malloc'ed
 * NUL-terminated plan JSON in *plan_json, or on failure a malloc'ed message
 * in *error (either may be left NULL); the runtime free()s them. */
typedef struct FlexCompilerHooks {
  uint32_t struct_size; /* sizeof(FlexCompilerHooks) */
  FlexStatus (*compile_mlir)(void *user_data, const char *mlir_text,
                             size_t length, const FlexCompileOptions *options,
                             char **plan_json, char **error);
  FlexStatus (*compile_config)(void *user_data, const FlexLayerConfig *config,
                               const FlexCompileOptions *options,
                               char **plan_json, char **error);
  void *user_data;
} FlexCompilerHooks;

/* Registers the compiler (the hooks are copied); NULL unregisters. Called by
 * the compiler library's flexCompilerRegister() or its user. */
FlexStatus flexSetCompiler(const FlexCompilerHooks *hooks);
/* 1 when a compiler is registered. */
int32_t flexHasCompiler(void);

/* Compiles a layer from `moe` dialect MLIR text into an executable.
 * FLEX_STATUS_UNAVAILABLE when no compiler is registered. */
FlexStatus flexCompileLayer(FlexContext context, const char *mlir_text,
                            size_t length, const FlexCompileOptions *options,
                            FlexExecutable *executable);
/* The same from a layer configuration. */
FlexStatus flexCompileLayerConfig(FlexContext context,
                                  const FlexLayerConfig *config,
                                  const FlexCompileOptions *options,
                                  FlexExecutable *executable);
/* Compiles MLIR text to plan JSON only; *plan_json is malloc'ed, free it with
 * flexFreeString. */
FlexStatus flexCompileLayerToPlan(const char *mlir_text, size_t length,
                                  const FlexCompileOptions *options,
                                  char **plan_json);
void flexFreeString(char *text);

#ifdef __cplusplus
}
#endif

#endif /* FLEX_C_FLEX_H */
