/* A fake libax_engine.so for the tests: the C API pyaxengine's cffi declares, the graphs in Python.
 *
 * Implements every function of the engine cdef in AXERA-TECH/pyaxengine 3554448
 * (axengine/_axe_capi.py), with the struct layouts of fake_ax.h. It exports
 * AX_ENGINE_GetTotalOps and AX_ENGINE_SetAffinity, so pyaxengine takes it for an MC20E
 * chip (AX630C/AX620Q: _axe.py `_get_chip_type`), the chip of M5Stack's Module LLM.
 *
 * What a model file is and what a graph computes are not known here: the test registers
 * four callbacks (FAKE_ENGINE_SetCallbacks) and the engine asks them
 *   - model_type(data, size): the file's model type (MC20E: 0 half core, 1 full core), or < 0
 *     when it is not a model;
 *   - load(id, data, size): describe the model, by calling FAKE_ENGINE_AddTensor for every
 *     input and output of every shape group, in order; nonzero when it cannot be loaded;
 *   - run(id, group, inputs, outputs): compute group `group` from the device copies of the
 *     inputs into the device copies of the outputs (arrays of pointers, graph order);
 *   - unload(id).
 * The engine owns the AX_ENGINE_IO_INFO_T structs it hands out (one per shape group) and
 * checks each run as strictly as it can see: a handle and a context of that handle, a group
 * in range, exactly the group's number of inputs and outputs in the AX_ENGINE_IO_T (the
 * engine cannot know how long the caller's arrays are: it trusts the counts), each buffer
 * at least the tensor's nSize and inside one CMM block. It reads only the DEVICE copies
 * (FAKE_SYS_Device, libax_sys.so): what the host wrote and did not flush is not seen.
 *
 * The NPU's virtual-NPU mode: AX_ENGINE_GetVNPUAttr fails until the NPU is initialised
 * (pyaxengine then initialises it with VNPU disabled), unless $VLMD_FAKE_BOARD_VNPU names
 * the mode another program on the board already initialised it in (0..3, pyaxengine's
 * VNPUType). $VLMD_FAKE_BOARD_NO_BF16=1 reports bf16 tensors as AX_ENGINE_DT_UNKNOWN, as a
 * libax_engine older than AX620E SDK 3.12 / AX650 SDK 2.18 does (pyaxengine's README since
 * 0c655ac). Both are read when asked, so a test can change them per session.
 *
 * Not AXERA's code: written for vlmd's tests from the declarations above.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fake_ax.h"

#define MODEL_MAGIC 0x4d4f44454cULL
#define CONTEXT_MAGIC 0x434f4e5458ULL
#define ERR_INVALID ((AX_S32)0x800B0003)
#define ERR_NOT_INIT ((AX_S32)0x800B0004)
#define ERR_RUN ((AX_S32)0x800B0001)
#define MAX_DIMS 8

typedef AX_S32 (*ModelTypeFn)(const AX_VOID *data, AX_U32 size);
typedef AX_S32 (*LoadFn)(AX_U64 id, const AX_VOID *data, AX_U32 size);
typedef AX_S32 (*RunFn)(AX_U64 id, AX_U32 group, AX_VOID **inputs, AX_VOID **outputs);
typedef void (*UnloadFn)(AX_U64 id);

typedef struct {
    AX_ENGINE_IO_INFO_T info;
    AX_U32 cap_inputs, cap_outputs;
} Group;

typedef struct {
    AX_U64 magic;
    AX_U64 id;
    Group *groups;
    AX_U32 n_groups;
    AX_ENGINE_NPU_SET_T affinity;
    int destroyed;
} Model;

typedef struct {
    AX_U64 magic;
    Model *model;
} Context;

typedef struct {
    AX_U64 handles, contexts, destroyed, runs, refused_runs;
} FakeEngineStats;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static ModelTypeFn model_type_fn;
static LoadFn load_fn;
static RunFn run_fn;
static UnloadFn unload_fn;
static AX_U64 next_id = 1;
static Model *loading; /* the model whose load callback runs now (AddTensor fills it) */
static int initialised;
static int own_mode;
static FakeEngineStats stats;
static AX_ENGINE_IO_META_EX_T no_extra;

void FAKE_ENGINE_SetCallbacks(ModelTypeFn type_fn, LoadFn load, RunFn run, UnloadFn unload) {
    pthread_mutex_lock(&lock);
    model_type_fn = type_fn;
    load_fn = load;
    run_fn = run;
    unload_fn = unload;
    pthread_mutex_unlock(&lock);
}

void FAKE_ENGINE_GetStats(FakeEngineStats *out) {
    pthread_mutex_lock(&lock);
    *out = stats;
    pthread_mutex_unlock(&lock);
}

/* sizeof / offsetof of the structs, for the test that compares them with cffi's. */
AX_U64 FAKE_ENGINE_Layout(const char *what) {
#define SIZE(T) if (!strcmp(what, #T)) return sizeof(T);
#define FIELD(T, F) if (!strcmp(what, #T "." #F)) return offsetof(T, F);
    SIZE(AX_ENGINE_NPU_ATTR_T) SIZE(AX_ENGINE_IO_META_EX_T) SIZE(AX_ENGINE_HANDLE_EXTRA_T)
    SIZE(AX_ENGINE_CMM_INFO_T) SIZE(AX_ENGINE_IO_SETTING_T) SIZE(AX_ENGINE_IO_META_T)
    SIZE(AX_ENGINE_IO_INFO_T) SIZE(AX_ENGINE_IO_BUFFER_T) SIZE(AX_ENGINE_IO_T)
    FIELD(AX_ENGINE_HANDLE_EXTRA_T, pName)
    FIELD(AX_ENGINE_IO_META_T, pShape) FIELD(AX_ENGINE_IO_META_T, nShapeSize) FIELD(AX_ENGINE_IO_META_T, eLayout)
    FIELD(AX_ENGINE_IO_META_T, eDataType) FIELD(AX_ENGINE_IO_META_T, pExtraMeta) FIELD(AX_ENGINE_IO_META_T, nSize)
    FIELD(AX_ENGINE_IO_META_T, pStride) FIELD(AX_ENGINE_IO_META_T, u64Reserved)
    FIELD(AX_ENGINE_IO_INFO_T, nInputSize) FIELD(AX_ENGINE_IO_INFO_T, pOutputs) FIELD(AX_ENGINE_IO_INFO_T, nOutputSize)
    FIELD(AX_ENGINE_IO_INFO_T, bDynamicBatchSize) FIELD(AX_ENGINE_IO_INFO_T, u64Reserved)
    FIELD(AX_ENGINE_IO_BUFFER_T, pVirAddr) FIELD(AX_ENGINE_IO_BUFFER_T, nSize) FIELD(AX_ENGINE_IO_BUFFER_T, pStride)
    FIELD(AX_ENGINE_IO_BUFFER_T, nStrideSize) FIELD(AX_ENGINE_IO_BUFFER_T, u64Reserved)
    FIELD(AX_ENGINE_IO_T, nInputSize) FIELD(AX_ENGINE_IO_T, pOutputs) FIELD(AX_ENGINE_IO_T, nOutputSize)
    FIELD(AX_ENGINE_IO_T, nBatchSize) FIELD(AX_ENGINE_IO_T, pIoSetting) FIELD(AX_ENGINE_IO_T, u64Reserved)
#undef SIZE
#undef FIELD
    return (AX_U64)-1;
}

static int element_size(int dtype) {
    switch (dtype) {
    case AX_ENGINE_DT_UINT8: case AX_ENGINE_DT_SINT8: return 1;
    case AX_ENGINE_DT_UINT16: case AX_ENGINE_DT_SINT16: case AX_ENGINE_DT_BFLOAT16: return 2;
    case AX_ENGINE_DT_FLOAT32: case AX_ENGINE_DT_SINT32: case AX_ENGINE_DT_UINT32: return 4;
    case AX_ENGINE_DT_FLOAT64: return 8;
    default: return 0;
    }
}

/* Called by the load callback: one more input (is_output 0) or output of shape group `group`. */
AX_S32 FAKE_ENGINE_AddTensor(AX_U64 id, AX_U32 group, AX_S32 is_output, const char *name, AX_S32 dtype,
                             AX_U32 ndim, const AX_S32 *shape) {
    Model *model = loading;
    int size = element_size(dtype);
    if (model == NULL || model->id != id || name == NULL || ndim == 0 || ndim > MAX_DIMS || size == 0)
        return ERR_INVALID;
    if (group >= model->n_groups) {
        Group *grown = realloc(model->groups, (group + 1) * sizeof *grown);
        if (grown == NULL)
            return ERR_INVALID;
        memset(grown + model->n_groups, 0, (group + 1 - model->n_groups) * sizeof *grown);
        model->groups = grown;
        model->n_groups = group + 1;
    }
    Group *g = &model->groups[group];
    AX_ENGINE_IO_META_T **metas = is_output ? &g->info.pOutputs : &g->info.pInputs;
    AX_U32 *count = is_output ? &g->info.nOutputSize : &g->info.nInputSize;
    AX_U32 *cap = is_output ? &g->cap_outputs : &g->cap_inputs;
    if (*count == *cap) {
        AX_U32 grown_cap = *cap ? 2 * *cap : 8;
        AX_ENGINE_IO_META_T *grown = realloc(*metas, grown_cap * sizeof *grown);
        if (grown == NULL)
            return ERR_INVALID;
        *metas = grown;
        *cap = grown_cap;
    }
    AX_ENGINE_IO_META_T *meta = &(*metas)[(*count)++];
    memset(meta, 0, sizeof *meta);
    meta->pName = strdup(name);
    meta->pShape = calloc(ndim, sizeof *meta->pShape);
    meta->pStride = calloc(ndim, sizeof *meta->pStride);
    AX_U64 nbytes = (AX_U64)size;
    for (AX_U32 i = 0; i < ndim; i++) {
        meta->pShape[i] = shape[i];
        nbytes *= (AX_U64)shape[i];
    }
    for (AX_U32 i = ndim; i-- > 0;)
        meta->pStride[i] = (AX_S32)(i + 1 == ndim ? size : meta->pStride[i + 1] * shape[i + 1]);
    meta->nShapeSize = (AX_U8)ndim;
    meta->eLayout = AX_ENGINE_TENSOR_LAYOUT_NHWC;
    meta->eMemoryType = AX_ENGINE_MT_PHYSICAL;
    const char *no_bf16 = getenv("VLMD_FAKE_BOARD_NO_BF16");
    meta->eDataType = (dtype == AX_ENGINE_DT_BFLOAT16 && no_bf16 && !strcmp(no_bf16, "1")) ? AX_ENGINE_DT_UNKNOWN
                                                                                          : (AX_ENGINE_DATA_TYPE_T)dtype;
    meta->pExtraMeta = &no_extra;
    meta->nSize = (AX_U32)nbytes;
    g->info.nMaxBatchSize = 1;
    g->info.bDynamicBatchSize = AX_FALSE;
    return 0;
}

static int other_service_mode(void) {
    const char *mode = getenv("VLMD_FAKE_BOARD_VNPU");
    return (mode && *mode) ? atoi(mode) : -1;
}

const AX_CHAR *AX_ENGINE_GetVersion(AX_VOID) { return "0.0.0 fake (vlmd tests)"; }

AX_VOID AX_ENGINE_NPUReset(AX_VOID) {}

AX_S32 AX_ENGINE_Init(AX_ENGINE_NPU_ATTR_T *pNpuAttr) {
    if (pNpuAttr == NULL || (int)pNpuAttr->eHardMode < 0 || (int)pNpuAttr->eHardMode > 3)
        return ERR_INVALID;
    int other = other_service_mode();
    if (other >= 0 && other != (int)pNpuAttr->eHardMode)
        return ERR_INVALID; /* the NPU is already in another mode */
    pthread_mutex_lock(&lock);
    initialised = 1;
    own_mode = (int)pNpuAttr->eHardMode;
    pthread_mutex_unlock(&lock);
    return 0;
}

AX_S32 AX_ENGINE_GetVNPUAttr(AX_ENGINE_NPU_ATTR_T *pNpuAttr) {
    if (pNpuAttr == NULL)
        return ERR_INVALID;
    int other = other_service_mode();
    if (other >= 0) {
        pNpuAttr->eHardMode = (AX_ENGINE_NPU_MODE_T)other;
        return 0;
    }
    if (!initialised)
        return ERR_NOT_INIT;
    pNpuAttr->eHardMode = (AX_ENGINE_NPU_MODE_T)own_mode;
    return 0;
}

AX_S32 AX_ENGINE_Deinit(AX_VOID) {
    pthread_mutex_lock(&lock);
    initialised = 0;
    pthread_mutex_unlock(&lock);
    return 0;
}

AX_S32 AX_ENGINE_GetModelType(const AX_VOID *pData, AX_U32 nDataSize, AX_ENGINE_MODEL_TYPE_T *pModelType) {
    if (pData == NULL || nDataSize == 0 || pModelType == NULL || model_type_fn == NULL)
        return ERR_INVALID;
    AX_S32 type = model_type_fn(pData, nDataSize);
    if (type < 0)
        return ERR_INVALID;
    *pModelType = (AX_ENGINE_MODEL_TYPE_T)type;
    return 0;
}

static void free_model(Model *model) {
    for (AX_U32 g = 0; g < model->n_groups; g++) {
        AX_ENGINE_IO_INFO_T *info = &model->groups[g].info;
        for (int out = 0; out < 2; out++) {
            AX_ENGINE_IO_META_T *metas = out ? info->pOutputs : info->pInputs;
            AX_U32 count = out ? info->nOutputSize : info->nInputSize;
            for (AX_U32 i = 0; i < count; i++) {
                free(metas[i].pName);
                free(metas[i].pShape);
                free(metas[i].pStride);
            }
            free(metas);
        }
    }
    free(model->groups);
    model->magic = 0;
    free(model);
}

AX_S32 AX_ENGINE_CreateHandleV2(uint64_t **pHandle, const AX_VOID *pData, AX_U32 nDataSize,
                                AX_ENGINE_HANDLE_EXTRA_T *pExtraParam) {
    (void)pExtraParam;
    if (pHandle == NULL || pData == NULL || nDataSize == 0 || load_fn == NULL)
        return ERR_INVALID;
    if (!initialised)
        return ERR_NOT_INIT;
    Model *model = calloc(1, sizeof *model);
    if (model == NULL)
        return ERR_INVALID;
    model->magic = MODEL_MAGIC;
    pthread_mutex_lock(&lock); /* loads are serialised: AddTensor fills `loading` */
    model->id = next_id++;
    loading = model;
    AX_S32 ret = load_fn(model->id, pData, nDataSize);
    loading = NULL;
    if (ret == 0 && model->n_groups == 0)
        ret = ERR_INVALID;
    for (AX_U32 g = 0; ret == 0 && g < model->n_groups; g++)
        if (model->groups[g].info.nInputSize == 0 || model->groups[g].info.nOutputSize == 0)
            ret = ERR_INVALID;
    if (ret == 0)
        stats.handles++;
    pthread_mutex_unlock(&lock);
    if (ret != 0) {
        free_model(model);
        return ret;
    }
    *pHandle = (uint64_t *)model;
    return 0;
}

static Model *as_model(uint64_t *handle) {
    Model *model = (Model *)handle;
    return (model != NULL && model->magic == MODEL_MAGIC && !model->destroyed) ? model : NULL;
}

AX_S32 AX_ENGINE_DestroyHandle(uint64_t *nHandle) {
    Model *model = as_model(nHandle);
    if (model == NULL)
        return ERR_INVALID;
    /* Kept allocated: a context or an IO info pointer may still be held; marked destroyed. */
    model->destroyed = 1;
    pthread_mutex_lock(&lock);
    stats.destroyed++;
    pthread_mutex_unlock(&lock);
    if (unload_fn != NULL)
        unload_fn(model->id);
    return 0;
}

AX_S32 AX_ENGINE_GetIOInfo(uint64_t *nHandle, AX_ENGINE_IO_INFO_T **pIO) {
    Model *model = as_model(nHandle);
    if (model == NULL || pIO == NULL)
        return ERR_INVALID;
    *pIO = &model->groups[0].info;
    return 0;
}

AX_S32 AX_ENGINE_GetGroupIOInfoCount(uint64_t *nHandle, AX_U32 *pCount) {
    Model *model = as_model(nHandle);
    if (model == NULL || pCount == NULL)
        return ERR_INVALID;
    *pCount = model->n_groups;
    return 0;
}

AX_S32 AX_ENGINE_GetGroupIOInfo(uint64_t *nHandle, AX_U32 nIndex, AX_ENGINE_IO_INFO_T **pIO) {
    Model *model = as_model(nHandle);
    if (model == NULL || pIO == NULL || nIndex >= model->n_groups)
        return ERR_INVALID;
    *pIO = &model->groups[nIndex].info;
    return 0;
}

AX_S32 AX_ENGINE_GetHandleModelType(uint64_t *nHandle, AX_ENGINE_MODEL_TYPE_T *pModelType) {
    if (as_model(nHandle) == NULL || pModelType == NULL)
        return ERR_INVALID;
    *pModelType = AX_ENGINE_MODEL_TYPE0;
    return 0;
}

AX_S32 AX_ENGINE_CreateContextV2(uint64_t *nHandle, uint64_t **pContext) {
    Model *model = as_model(nHandle);
    if (model == NULL || pContext == NULL)
        return ERR_INVALID;
    Context *context = calloc(1, sizeof *context);
    if (context == NULL)
        return ERR_INVALID;
    context->magic = CONTEXT_MAGIC;
    context->model = model;
    pthread_mutex_lock(&lock);
    stats.contexts++;
    pthread_mutex_unlock(&lock);
    *pContext = (uint64_t *)context;
    return 0;
}

static AX_S32 refuse(void) {
    pthread_mutex_lock(&lock);
    stats.refused_runs++;
    pthread_mutex_unlock(&lock);
    return ERR_RUN;
}

/* The device copy behind one IO buffer, if it holds the tensor. */
static AX_VOID *device_of(const AX_ENGINE_IO_BUFFER_T *buffer, const AX_ENGINE_IO_META_T *meta) {
    if (buffer->nSize < meta->nSize)
        return NULL;
    return FAKE_SYS_Device(buffer->phyAddr, meta->nSize);
}

AX_S32 AX_ENGINE_RunGroupIOSync(uint64_t *handle, uint64_t *context, AX_U32 nIndex, AX_ENGINE_IO_T *pIO) {
    Model *model = as_model(handle);
    Context *ctx = (Context *)context;
    if (!initialised || model == NULL || ctx == NULL || ctx->magic != CONTEXT_MAGIC || ctx->model != model ||
        pIO == NULL || nIndex >= model->n_groups || run_fn == NULL)
        return refuse();
    const AX_ENGINE_IO_INFO_T *info = &model->groups[nIndex].info;
    if (pIO->nInputSize != info->nInputSize || pIO->nOutputSize != info->nOutputSize || pIO->pInputs == NULL ||
        pIO->pOutputs == NULL)
        return refuse();
    AX_VOID **inputs = calloc(info->nInputSize, sizeof *inputs);
    AX_VOID **outputs = calloc(info->nOutputSize, sizeof *outputs);
    AX_S32 ret = (inputs && outputs) ? 0 : ERR_RUN;
    for (AX_U32 i = 0; ret == 0 && i < info->nInputSize; i++)
        if ((inputs[i] = device_of(&pIO->pInputs[i], &info->pInputs[i])) == NULL)
            ret = ERR_RUN;
    for (AX_U32 i = 0; ret == 0 && i < info->nOutputSize; i++)
        if ((outputs[i] = device_of(&pIO->pOutputs[i], &info->pOutputs[i])) == NULL)
            ret = ERR_RUN;
    if (ret == 0 && run_fn(model->id, nIndex, inputs, outputs) != 0)
        ret = ERR_RUN;
    free(inputs);
    free(outputs);
    if (ret != 0)
        return refuse();
    pthread_mutex_lock(&lock);
    stats.runs++;
    pthread_mutex_unlock(&lock);
    return 0;
}

AX_S32 AX_ENGINE_RunSyncV2(uint64_t *handle, uint64_t *context, AX_ENGINE_IO_T *pIO) {
    return AX_ENGINE_RunGroupIOSync(handle, context, 0, pIO);
}

AX_S32 AX_ENGINE_SetAffinity(uint64_t *nHandle, AX_ENGINE_NPU_SET_T nNpuSet) {
    Model *model = as_model(nHandle);
    if (model == NULL)
        return ERR_INVALID;
    model->affinity = nNpuSet;
    return 0;
}

AX_S32 AX_ENGINE_GetAffinity(uint64_t *nHandle, AX_ENGINE_NPU_SET_T *pNpuSet) {
    Model *model = as_model(nHandle);
    if (model == NULL || pNpuSet == NULL)
        return ERR_INVALID;
    *pNpuSet = model->affinity;
    return 0;
}

AX_S32 AX_ENGINE_GetCMMUsage(uint64_t *nHandle, AX_ENGINE_CMM_INFO_T *pCMMInfo) {
    if (as_model(nHandle) == NULL || pCMMInfo == NULL)
        return ERR_INVALID;
    pCMMInfo->nCMMSize = 0; /* weights live in Python here */
    return 0;
}

const AX_CHAR *AX_ENGINE_GetModelToolsVersion(uint64_t *nHandle) {
    return as_model(nHandle) ? "0.0 fake (vlmd tests)" : "";
}

AX_S32 AX_ENGINE_GetTotalOps(void) { return 0; }
