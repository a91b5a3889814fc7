package standin

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.objects.PathObject

/**
 * Test support, not QuPath: the "current image" of the stand-in QP class.
 *
 * Loaded from the JSON file named by the system property {@code qupath.standin.state} (or the
 * environment variable {@code QUPATH_STANDIN_STATE}):
 * <pre>
 * {"uris": ["file:/data/a.svs"] (null: no image open), "objects": [GeoJSON Features],
 *  "selected": [ids], "gui": false (true: QuPathGUI.getInstance() is not null),
 *  "record": "/path/record.json"}
 * </pre>
 * After every change (objects added or removed, a dialog shown) the record file is rewritten:
 * {@code {"added": [ids], "removed": [ids], "dialogs": [{kind, title, message}],
 * "objects": [every object of the image as a Feature], "overlay": ..., "other_images":
 * {uri: [Features of an image opened before]}}}. {@link #switchTo} opens another image, as
 * QuPath's viewer does when the user opens another slide: a new ImageData and hierarchy,
 * the earlier image's objects kept apart (and restored when it is opened again).
 */
class ImageState {
    private static ImageState current

    List<String> uris
    List<PathObject> objects = []
    private final Map<String, Map> others = new LinkedHashMap<String, Map>()
    private final List<Closure> onSwitch = []
    final Set<String> selectedIds = new LinkedHashSet<String>()
    final boolean gui
    final File record
    final List<String> added = []
    final List<String> removed = []
    final List<Map> dialogs = []
    Map overlay = null
    private ImageData<Object> imageData

    private ImageState(Map state) {
        uris = state.uris == null ? null : ((List) state.uris).collect { it.toString() }
        ((List) (state.objects ?: [])).each { objects << GeoJson.fromFeature((Map) it) }
        ((List) (state.selected ?: [])).each { selectedIds << it.toString() }
        gui = state.gui == true
        record = state.record ? new File(state.record.toString()) : null
    }

    static synchronized ImageState get() {
        if (current == null) {
            String path = System.getProperty('qupath.standin.state') ?: System.getenv('QUPATH_STANDIN_STATE')
            if (!path)
                throw new IllegalStateException('QuPath stand-in: set -Dqupath.standin.state=STATE.json')
            current = new ImageState((Map) GeoJson.normalise(new JsonSlurper().parse(new File(path))))
        }
        return current
    }

    ImageServer<Object> server() {
        if (uris == null)
            return null
        List<URI> list = uris.collect { new URI(it) }
        return new ImageServer<Object>() {
            Collection<URI> getURIs() { return Collections.unmodifiableList(list) }
            String getPath() { return 'StandInServer: ' + list.join(', ') }
        }
    }

    synchronized ImageData<Object> imageData() {
        if (uris == null)
            return null
        if (imageData == null)
            imageData = new ImageData<Object>(objects)
        return imageData
    }

    /** Opens another image (its URIs, and its objects as GeoJSON Features when first opened). */
    void switchTo(List<String> newUris, List features) {
        List<Closure> listeners
        synchronized (this) {
            others.put(String.valueOf(uris), [uris: uris, objects: objects, imageData: imageData])
            Map back = others.remove(String.valueOf(newUris))
            uris = newUris
            objects = back == null ? features.collect { GeoJson.fromFeature((Map) it) } : (List<PathObject>) back.objects
            imageData = back == null ? null : (ImageData<Object>) back.imageData
            listeners = new ArrayList<Closure>(onSwitch)
        }
        listeners.each { it.call() }
        save()
    }

    /** Called after every {@link #switchTo} (the stand-in viewer listens). */
    synchronized void onImageSwitch(Closure listener) { onSwitch << listener }

    synchronized void overlay(Map shown) {
        overlay = shown
        save()
    }

    List<PathObject> selected() { return objects.findAll { selectedIds.contains(it.getID().toString()) } }

    synchronized void add(Collection<? extends PathObject> pathObjects) { addTo(objects, pathObjects) }

    synchronized void remove(Collection<? extends PathObject> pathObjects) { removeFrom(objects, pathObjects) }

    /** Adds to one image's objects (a hierarchy's: the current image's or an earlier one's). */
    synchronized void addTo(List<PathObject> target, Collection<? extends PathObject> pathObjects) {
        pathObjects.each { PathObject p -> if (!target.contains(p)) { target << p; added << p.getID().toString() } }
        save()
    }

    synchronized void removeFrom(List<PathObject> target, Collection<? extends PathObject> pathObjects) {
        List<PathObject> gone = new ArrayList<PathObject>(pathObjects)
        gone.each { PathObject p -> if (target.remove(p)) { removed << p.getID().toString(); selectedIds.remove(p.getID().toString()) } }
        save()
    }

    synchronized void dialog(String kind, String title, String message) {
        dialogs << [kind: kind, title: title, message: message]
        save()
    }

    synchronized void save() {
        if (record == null)
            return
        Map out = [added: added, removed: removed, dialogs: dialogs, objects: objects.collect { GeoJson.toFeature(it) },
                   overlay: overlay,
                   other_images: others.collectEntries { String k, Map v ->
                       [(((List) v.uris)[0]): ((List<PathObject>) v.objects).collect { GeoJson.toFeature(it) }]
                   }]
        File tmp = new File(record.getPath() + '.tmp')
        tmp.setText(JsonOutput.toJson(out), 'UTF-8')
        record.delete()
        tmp.renameTo(record)
    }
}
